// The host side of the loopback transport (a LocalGroup whose members share a GPU): the hub
// that matches one member's offers with another's takes. No GPU needed: offers carry no
// events here. Asserts FIFO order per (from, to, tag), independence of tags and directions,
// a take that blocks until the offer arrives, bounded waits that end in Error(timeout) naming
// both members, and abort() waking a blocked member with an error.
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <string>
#include <thread>

#include "comm/loopback_transport.hpp"
#include "ringattn/error.hpp"

using ringattn::Error;
using ringattn::ErrorCode;
using ringattn::detail::LoopbackHub;
using ringattn::detail::Pieces;

namespace {

LoopbackHub::Offer offer_of(const void* base, std::size_t bytes) {
  LoopbackHub::Offer o;
  o.base = base;
  o.pieces = Pieces::whole(bytes);
  return o;
}

TEST(LoopbackHub, OffersComeOutInOrderPerChannel) {
  LoopbackHub hub(3);
  int a = 0, b = 0, c = 0, d = 0;
  hub.offer(0, 1, 0, offer_of(&a, 4));
  hub.offer(0, 1, 1, offer_of(&c, 12));  // another tag: its own queue
  hub.offer(0, 1, 0, offer_of(&b, 8));
  hub.offer(2, 1, 0, offer_of(&d, 16));  // another sender
  EXPECT_EQ(hub.take(0, 1, 0, 1.0).base, &a);
  EXPECT_EQ(hub.take(2, 1, 0, 1.0).base, &d);
  const LoopbackHub::Offer second = hub.take(0, 1, 0, 1.0);
  EXPECT_EQ(second.base, &b);
  EXPECT_EQ(second.pieces.total(), 8u);
  EXPECT_EQ(hub.take(0, 1, 1, 1.0).base, &c);
  hub.hand_back(0, 1, 0, nullptr);  // member 1 has read member 0's offer; member 0 awaits that
  EXPECT_NO_THROW(hub.await_copied(0, 1, 0, 1.0));
}

TEST(LoopbackHub, TakeWaitsForTheOffer) {
  LoopbackHub hub(2);
  int x = 0;
  auto taken = std::async(std::launch::async, [&] { return hub.take(1, 0, 0, 10.0).base; });
  EXPECT_EQ(taken.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout);  // nothing offered yet
  hub.offer(1, 0, 0, offer_of(&x, 4));
  EXPECT_EQ(taken.get(), &x);
}

TEST(LoopbackHub, BoundedWaitsEndInATimeoutNamingBothMembers) {
  LoopbackHub hub(2);
  const auto start = std::chrono::steady_clock::now();
  try {
    hub.take(0, 1, 0, 0.2);
    ADD_FAILURE() << "take returned without an offer";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout);
    const std::string what = e.what();
    // The bound as given: a sub-second one used to print as "waited 0 s".
    EXPECT_NE(what.find("member 1 waited 0.2 s"), std::string::npos) << what;
    EXPECT_NE(what.find("from member 0"), std::string::npos) << what;
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(waited, 0.19);
  EXPECT_LT(waited, 5.0);
  try {
    hub.await_copied(1, 0, 0, 0.1);  // member 1 waits for member 0's receipt
    ADD_FAILURE() << "await_copied returned without a receipt";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout);
    EXPECT_NE(std::string(e.what()).find("member 1 waited"), std::string::npos) << e.what();
  }
}

TEST(LoopbackHub, AbortWakesABlockedMember) {
  LoopbackHub hub(2);
  EXPECT_FALSE(hub.aborted());
  auto blocked = std::async(std::launch::async, [&] {
    try {
      hub.take(0, 1, 0, 0.0);  // no bound: only abort() ends it
      return std::string("returned");
    } catch (const Error& e) {
      return std::string(e.what());
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  hub.abort();
  ASSERT_EQ(blocked.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_NE(blocked.get().find("another member failed"), std::string::npos);
  EXPECT_TRUE(hub.aborted());
}

}  // namespace

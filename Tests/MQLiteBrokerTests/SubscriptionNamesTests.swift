import Testing

@testable import MQLiteBroker

/// The names a client used for filters an `on_subscribe` hook rewrote (no broker, no socket).
@Suite("Subscription names")
struct SubscriptionNamesTests {
    /// A session's subscriptions as `SubscriptionNames` sees them, with the broker's calls.
    private struct Client {
        var names = SubscriptionNames()
        var subscribed: Set<String> = []

        mutating func subscribe(_ name: String, as filter: String) {
            let replaced = names.subscribed(name: name, as: filter) { subscribed.contains($0) }
            subscribed.insert(filter)
            if let replaced { subscribed.remove(replaced) }
        }

        mutating func unsubscribe(_ name: String) {
            if let filter = names.unsubscribed(name: name) { subscribed.remove(filter) }
        }
    }

    @Test("UNSUBSCRIBE of the name removes the rewritten filter; an unrewritten one keeps no entry")
    func rewriteThenUnsubscribe() {
        var c = Client()
        c.subscribe("plain", as: "plain")
        #expect(c.names.isEmpty, "a filter subscribed as named costs nothing")
        c.subscribe("mine/#", as: "tenant/a/mine/#")
        #expect(c.names.filter(named: "mine/#") == "tenant/a/mine/#")
        #expect(c.subscribed == ["plain", "tenant/a/mine/#"])
        c.unsubscribe("mine/#")
        #expect(c.subscribed == ["plain"] && c.names.isEmpty)
        c.unsubscribe("plain")
        #expect(c.subscribed.isEmpty)
    }

    @Test("a filter two names map to goes with the last of them; one also named directly stays")
    func sharedTarget() {
        var c = Client()
        c.subscribe("a", as: "t")
        c.subscribe("b", as: "t")
        c.unsubscribe("a")
        #expect(c.subscribed == ["t"])
        c.unsubscribe("b")
        #expect(c.subscribed.isEmpty && c.names.isEmpty)

        c.subscribe("t", as: "t")  // directly
        c.subscribe("a", as: "t")  // and through a rewrite
        c.unsubscribe("a")
        #expect(c.subscribed == ["t"], "still named directly")
        c.unsubscribe("t")
        #expect(c.subscribed.isEmpty && c.names.isEmpty)

        c.subscribe("a", as: "t")
        c.subscribe("t", as: "t")  // named directly after the rewrite
        c.unsubscribe("t")
        #expect(c.subscribed == ["t"], "still the target of a")
        c.unsubscribe("t")
        #expect(c.subscribed == ["t"], "t is only the target of a now: UNSUBSCRIBE t is a no-op")
        c.unsubscribe("a")
        #expect(c.subscribed.isEmpty && c.names.isEmpty)
    }

    @Test("re-subscribing a name that now maps elsewhere replaces the old filter")
    func resubscribe() {
        var c = Client()
        c.subscribe("x", as: "x")
        c.subscribe("x", as: "y")  // the hook now rewrites x
        #expect(c.subscribed == ["y"])
        c.subscribe("x", as: "z")
        #expect(c.subscribed == ["z"])
        c.subscribe("x", as: "x")  // no longer rewritten
        #expect(c.subscribed == ["x"] && c.names.isEmpty)
    }

    @Test("a filter the ACL no longer allows takes its names with it")
    func revoked() {
        var c = Client()
        c.subscribe("a", as: "t")
        c.subscribe("b", as: "t")
        c.names.removeAll(subscribedAs: "t")
        #expect(c.names.isEmpty)
        #expect(c.names.unsubscribed(name: "a") == "a", "a is just a name again")
    }

    @Test("entries stay bounded by what the client names: 10,000 rewrites then their UNSUBSCRIBEs leave nothing")
    func bounded() {
        var c = Client()
        for i in 0..<10_000 { c.subscribe("n/\(i)", as: "t/\(i % 100)") }
        #expect(c.subscribed.count == 100)
        for i in 0..<10_000 { c.unsubscribe("n/\(i)") }
        #expect(c.subscribed.isEmpty && c.names.isEmpty)
    }
}

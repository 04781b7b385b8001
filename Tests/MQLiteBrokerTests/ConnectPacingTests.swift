import Foundation
import NIOCore
import NIOEmbedded
import Testing

@testable import MQLiteBroker

@Suite("Connect pacing: a storm spread over loop ticks")
struct ConnectPacingTests {
    /// A paced pacing whose current tick has started one CONNECT and then spent its budget.
    private func spentTick() -> (EmbeddedEventLoop, ConnectPacing) {
        let loop = EmbeddedEventLoop()
        let pacing = ConnectPacing(loop: loop)
        pacing.spendTheTick()
        return (loop, pacing)
    }

    @Test("without ticks told (a group the broker did not make), everything goes on at once")
    func unpaced() {
        let pacing = ConnectPacing(loop: EmbeddedEventLoop())
        var ran = 0
        for _ in 0..<100 {
            guard case .now = pacing.admit() else { Issue.record("a CONNECT waited"); return }
            pacing.run { ran += 1 }
            usleep(100)
        }
        #expect(ran == 100)
        #expect(pacing.waitingCount == 0)
    }

    @Test("past its budget a tick starts nothing more: answers, then CONNECTs, wait in order for a later tick")
    func paced() throws {
        let loop = EmbeddedEventLoop()
        let pacing = ConnectPacing(loop: loop, paced: true)
        var order: [String] = []
        guard case .now = pacing.admit() else { Issue.record("the first CONNECT of a tick waited"); return }
        pacing.run { order.append("answer 0") }
        #expect(order == ["answer 0"], "within the budget an answer goes on at once")
        usleep(UInt32(ConnectPacing.budget.nanoseconds / 1000) + 500)  // the tick's budget is spent
        guard case .later(let first) = pacing.admit() else { Issue.record("a CONNECT started past the budget"); return }
        first.whenSuccess { order.append("connect 1") }
        pacing.run { order.append("answer 1") }
        pacing.run { order.append("answer 2") }
        pacing.tickEnded()
        // A new tick with room: a CONNECT still waits behind those waiting...
        guard case .later(let second) = pacing.admit() else { Issue.record("a CONNECT went ahead of those waiting"); return }
        second.whenSuccess { order.append("connect 2") }
        // ...and so does an answer behind the answers that wait.
        pacing.run { order.append("answer 3") }
        #expect(pacing.waitingCount == 5)
        #expect(order == ["answer 0"])

        // They start in a task of a later tick (scheduled a little ahead): answers first.
        loop.advanceTime(by: .milliseconds(1))
        #expect(order == ["answer 0", "answer 1", "answer 2", "answer 3", "connect 1", "connect 2"])
        #expect(pacing.waitingCount == 0)
    }

    @Test("an answer goes ahead of CONNECTs that wait: work under way finishes before new work starts")
    func answersFirst() throws {
        let (_, pacing) = spentTick()
        guard case .later = pacing.admit() else { Issue.record("a CONNECT started past the budget"); return }
        pacing.tickEnded()
        var ran = false
        pacing.run { ran = true }
        #expect(ran, "an answer waited behind a CONNECT")
        #expect(pacing.waitingCount == 1)
    }

    @Test("stop runs what waits at once (no promise left unfulfilled), and nothing waits after")
    func stop() throws {
        let (_, pacing) = spentTick()
        guard case .later(let waiting) = pacing.admit() else { Issue.record("a CONNECT started past the budget"); return }
        var done = false
        waiting.whenSuccess { done = true }
        pacing.stop()
        #expect(done)
        guard case .now = pacing.admit() else { Issue.record("waited after stop"); return }
    }

    @Test("the task that would start them in the tick that queued them waits for the next tick")
    func notInTheSameTick() throws {
        let (loop, pacing) = spentTick()
        var ran = false
        pacing.run { ran = true }
        // The same tick: its drain task reschedules itself (20, 40, 80, 160, 320 µs: 620 in all).
        loop.advanceTime(by: .microseconds(600))
        #expect(!ran)
        pacing.tickEnded()
        loop.advanceTime(by: .milliseconds(1))
        #expect(ran)
    }

    @Test("a tick that never ends (each batch of its tasks longer than the wait) does not spin on the drain: it goes on after the longest wait")
    func aTickThatNeverEnds() throws {
        let (loop, pacing) = spentTick()
        var ran = false
        pacing.run { ran = true }
        // EmbeddedEventLoop runs every task that comes due, as NIO's loop does while a batch of
        // tasks takes longer than the drain's wait: without a last wait the drain would
        // reschedule itself for ever, and `advanceTime` would run it every 20 µs of the 5 ms.
        loop.advanceTime(by: .milliseconds(5))
        #expect(ran)
        #expect(pacing.waitingCount == 0)
    }
}

extension ConnectPacing {
    /// Paced from now on, with the current tick's budget spent by one CONNECT (a storm) (tests).
    func spendTheTick() {
        paced = true
        _ = admit()
        usleep(UInt32(Self.budget.nanoseconds / 1000) + 500)
    }
}

import DequeModule
import NIOCore
import NIOPosix

/// Spreads a storm of CONNECTs, of hook answers and of closes over a worker's loop ticks, so that
/// the clients already connected keep their latency while a thousand others connect (or leave)
/// at once.
///
/// NIO handles every socket that one poll found ready before it polls again. A CONNECT costs
/// much more than a PUBLISH (a session, the connect hooks: a Lua call, maybe an HTTP request to
/// start), and so does the answer of a hook that waited (the rest of the Lua call, then CONNACK
/// or the PUBLISH it held). A thousand clients connecting at once make one poll find hundreds of
/// CONNECTs ready, and the answers of an auth service come back together: a client whose PUBLISH
/// was read in that poll waited behind all of them (tens of milliseconds). Here a tick (a poll
/// and the tasks after it) starts them only for `budget` after its first; the others wait for
/// later ticks, each of which polls the sockets first: answers first (work under way), in order,
/// then CONNECTs, in order (a waiting CONNECT with its client's reading paused). Without a storm
/// nothing waits: what finds room in its tick and nobody ahead goes on at once.
///
/// Owner-loop state. NIO's event loop metrics delegate (`TickObserver`) tells it of the ticks,
/// so a broker on a group it did not make (tests) does not pace.
final class ConnectPacing: @unchecked Sendable {
    /// How long after the first of them a tick may go on starting CONNECTs and hook answers.
    static let budget = TimeAmount.milliseconds(1)

    private let loop: any EventLoop
    /// When this tick started its first one; nil: none yet.
    private var tickStart: NIODeadline?
    /// Hook answers and closes waiting: work already under way (a CONNECT's hooks, a connected
    /// client's PUBLISH or SUBSCRIBE, a client gone), so they go before new CONNECTs.
    private var answers = Deque<() -> Void>()
    /// CONNECTs waiting to start.
    private var admissions = Deque<EventLoopPromise<Void>>()
    private var drainScheduled = false
    /// Ticks ended so far.
    private var ticks = 0
    /// Whether ticks are told (else everything goes on at once).
    var paced: Bool

    init(loop: any EventLoop, paced: Bool = false) {
        self.loop = loop
        self.paced = paced
    }

    /// Whether this tick may start one more (the first one starts its budget).
    private func tickHasRoom() -> Bool {
        let now = NIODeadline.now()
        guard let tickStart else {
            tickStart = now
            return true
        }
        return now - tickStart < Self.budget
    }

    /// On the loop, for each CONNECT before its hooks run: `.now`, or `.later`, answered in a
    /// later tick, after the answers and the CONNECTs that wait.
    func admit() -> HookAnswer<Void> {
        guard paced, !(answers.isEmpty && admissions.isEmpty && tickHasRoom()) else { return .now(()) }
        let promise = loop.makePromise(of: Void.self)
        admissions.append(promise)
        scheduleDrain()
        return .later(promise.futureResult)
    }

    /// On the loop, for a hook's answer (a Lua call resumed with what it waited for, and what the
    /// broker does with its result) or the close of a connection whose client sent FIN: runs
    /// `body` now, or in a later tick, after the answers that wait (but before the CONNECTs that
    /// wait).
    func run(_ body: @escaping () -> Void) {
        guard paced, !(answers.isEmpty && tickHasRoom()) else { return body() }
        answers.append(body)
        scheduleDrain()
    }

    /// On the loop: runs `body` in a later tick, after its poll of the sockets, with the answers
    /// (a long walk that yields: `Session.pump` sending retained messages). A task would not do:
    /// NIO runs the tasks that tasks add before it polls again. Unpaced, as the loop's next task.
    func later(_ body: @escaping () -> Void) {
        guard paced else { return loop.execute(body) }
        answers.append(body)
        scheduleDrain()
    }

    /// The broker is stopping, its connections closed: what waits goes on now (a CONNECT of a
    /// closed connection stops there; no promise is left unfulfilled), and from now on everything
    /// goes on at once.
    func stop() {
        paced = false
        while let next = answers.popFirst() { next() }
        while let next = admissions.popFirst() { next.succeed(()) }
    }

    /// What waits for a tick (tests).
    var waitingCount: Int { answers.count + admissions.count }

    /// A tick has ended (on the loop).
    func tickEnded() {
        tickStart = nil
        ticks &+= 1
    }

    /// How many times a drain that came due in the tick that scheduled it waits again (20 µs, then
    /// twice as long each time) before it goes on in that tick all the same.
    static let sameTickRetries = 6

    /// What waits starts in a later tick, after its poll of the sockets. A task scheduled a little
    /// ahead: one due now would run in this very tick (NIO runs the tasks that come due while it
    /// runs tasks), and one added after the tick (from `tickEnded`) would wait for the next I/O.
    private func scheduleDrain(retry: Int = 0) {
        guard !drainScheduled else { return }
        drainScheduled = true
        let tick = ticks
        loop.scheduleTask(in: .microseconds(20 << retry)) { self.drain(after: tick, retry: retry) }
    }

    private func drain(after tick: Int, retry: Int) {
        drainScheduled = false
        // Still the tick that scheduled it (its other tasks took longer): after the next poll. NIO
        // reads the clock once per batch of tasks, so while a batch takes longer than the wait (a
        // busy tick, a loaded machine, a sanitizer's build) the drain would come due again and
        // again and the tick never end: the loop would spin here, its sockets unread. So each wait
        // is twice the last, and after the longest (about 1.3 ms in all) it goes on in this tick,
        // with a budget of its own.
        if ticks == tick {
            guard retry >= Self.sameTickRetries else { return scheduleDrain(retry: retry + 1) }
            tickStart = nil
        }
        while waitingCount > 0, tickHasRoom() {
            if let answer = answers.popFirst() {
                answer()
            } else {
                admissions.removeFirst().succeed(())
            }
        }
        if waitingCount > 0 { scheduleDrain() }
    }
}

/// NIO's event loop metrics delegate for the broker's own group: tells each loop's
/// `ConnectPacing` that a tick ended. Called on the loop's thread after every tick; it finds the
/// pacing in a thread-specific variable (no lock, no map).
final class TickObserver: NIOEventLoopMetricsDelegate, Sendable {
    private let pacing = ThreadSpecificVariable<ConnectPacing>()

    func processedTick(info: NIOEventLoopTickInfo) {
        pacing.currentValue?.tickEnded()
    }

    /// Starts telling `pacing` of its loop's ticks (on that loop).
    func observe(_ pacing: ConnectPacing, on loop: any EventLoop) {
        loop.execute {
            self.pacing.currentValue = pacing
            pacing.paced = true
        }
    }
}

import Dispatch

/// Runs `body`, work that computes for a while without suspending, on a thread of its own, one
/// such body at a time in the test process.
///
/// Swift Testing runs every test as a task on the cooperative pool: one thread per core, two on
/// the CI host. A test that computes for a second or more without an `await` holds one of them;
/// two such at once hold the pool, and every other test waits them out at its next `await`. A
/// wall-clock bound in one of those (a keep-alive that must close in time, a connect that must be
/// quick) then reads the wait as its own, and fails for nothing it tested. Here the test's task
/// moves to a serial queue of its own (dispatch gives it a thread beside the pool's) for `body`,
/// so its task locals, and with them what `#expect` reports to, go along; and such bodies take
/// turns, so together they keep at most one core busy (run all at once, beside the brokers of
/// other tests, they starved those brokers' event loops instead).
public func offThePool<T>(_ body: () throws -> T) async throws -> T {
    await turns.take()
    do {
        let value = try await withTaskExecutorPreference(OwnThread()) { try body() }
        await turns.pass()
        return value
    } catch {
        await turns.pass()
        throw error
    }
}

private let turns = Turns()

private actor Turns {
    private var taken = false
    private var waiting: [CheckedContinuation<Void, Never>] = []

    func take() async {
        guard taken else { taken = true; return }
        await withCheckedContinuation { waiting.append($0) }
    }

    func pass() {
        if waiting.isEmpty { taken = false } else { waiting.removeFirst().resume() }
    }
}

private final class OwnThread: TaskExecutor {
    private let queue = DispatchQueue(label: "mqlite.tests.own-thread")

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        queue.async { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

#if MQLITE_TSAN
import MQTTCore

/// The ThreadSanitizer build's `Mutex` (`make test-tsan`): see MQTTCore's `TSanMutex`.
typealias Mutex<Value: ~Copyable> = TSanMutex<Value>
#endif

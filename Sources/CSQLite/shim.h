#include <sqlite3.h>

// SQLITE_TRANSIENT is a cast macro Swift cannot import: SQLite copies what is bound with it.
static inline sqlite3_destructor_type mqlite_sqlite_transient(void) { return SQLITE_TRANSIENT; }

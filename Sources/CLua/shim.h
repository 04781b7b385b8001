// Lua 5.4 (Debian's liblua5.4-dev) for Swift: the headers, plus static inline wrappers for the
// lua.h macros Swift cannot import, and the two places where Lua errors are raised from C so
// that a longjmp never crosses a Swift frame.
#ifndef MQLITE_CLUA_SHIM_H
#define MQLITE_CLUA_SHIM_H

#include <lua5.4/lua.h>
#include <lua5.4/lauxlib.h>
#include <lua5.4/lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>

static inline int mqlite_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline int mqlite_upvalueindex(int i) { return lua_upvalueindex(i); }
static inline void mqlite_pop(lua_State *L, int n) { lua_pop(L, n); }
static inline void mqlite_newtable(lua_State *L) { lua_newtable(L); }
static inline int mqlite_loadstring(lua_State *L, const char *chunk, size_t length, const char *name) {
    return luaL_loadbufferx(L, chunk, length, name, "t");
}

/// Generational garbage collection: hook calls leave short-lived tables behind, which is what
/// it is made for. (lua_gc is variadic, so Swift cannot call it directly.)
static inline void mqlite_gc_generational(lua_State *L) { lua_gc(L, LUA_GCGEN, 0, 0); }

/* ---------------------------------------------------------------------------------------------
 * Per-state control block: the memory budget, the instruction budget, and the clock (the last
 * through the watchdog, see LuaWatchdog.swift). One per lua_State, given to Lua as the allocator's
 * `ud`, so that every C function here finds it with lua_getallocf.
 *
 * Why a memory error never unwinds Swift frames: the budget is enforced only while Lua code runs
 * (`enforce`, set by mqlite_call around lua_pcall and cleared by the trampoline while a Swift
 * function of the host library runs). Host code (pushing hook arguments, reading results, the
 * mqlite.* functions) may overdraw the budget by what one such operation allocates; the next
 * allocation made by Lua code then fails inside lua_pcall, where the error is caught, and a state
 * left over it fails the call right after the host function or before the call starts
 * (mqlite_over_budget). So in Swift frames the allocator fails only on a real out-of-memory from
 * the OS, as any Swift allocation would.
 * ------------------------------------------------------------------------------------------- */
typedef struct mqlite_control {
    size_t used;            /* bytes currently allocated by this state */
    size_t limit;           /* memory budget */
    int enforce;            /* 1 while Lua code runs: allocations past `limit` fail */
    int step;               /* the limit hook runs every `step` instructions */
    long long instruction_limit;
    long long remaining;    /* instructions left to the running call */
    int exhausted;          /* the running call hit a limit: every instruction fails from now on */
    /* Shared with the watchdog thread (only through the atomic accessors below): calls started
     * plus calls finished (odd while a call runs), the call the watchdog found over the time
     * limit, and a stop request (every running call fails at its next check). */
    unsigned long calls;
    unsigned long expired;
    int stopping;
    /* What the running call queued outside its limits (mqlite_take_action). */
    int actions;
    size_t action_bytes;
} mqlite_control;

/// mqlite.publish, mqlite.disconnect and mqlite.reauthorize calls one hook call may make: each
/// queues work that runs outside the call's limits (a message routed, a hook run for another
/// client), so a loop of them in one call would amplify without bound.
#define MQLITE_MAX_ACTIONS 1000

/// Instructions between two runs of the limit hook (fewer when the instruction limit is smaller).
#define MQLITE_HOOK_STEP 1000

static void *mqlite_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    mqlite_control *c = (mqlite_control *)ud;
    size_t old = ptr ? osize : 0;  /* with ptr NULL, osize is the kind of object, not a size */
    if (nsize == 0) {
        free(ptr);
        c->used -= old;
        return NULL;
    }
    /* Growing past the budget fails while Lua code runs; shrinking never fails (Lua relies on it). */
    if (nsize > old && c->enforce && c->used - old + nsize > c->limit) return NULL;
    void *block = realloc(ptr, nsize);
    if (block == NULL) return NULL;
    c->used = c->used - old + nsize;
    return block;
}

static inline mqlite_control *mqlite_control_of(lua_State *L) {
    void *ud = NULL;
    (void)lua_getallocf(L, &ud);
    return (mqlite_control *)ud;
}

/// Lua calls this only for an error outside any protected call, which the host never makes:
/// say so clearly on stderr and abort, rather than let Lua abort without a word.
static int mqlite_panic(lua_State *L) {
    const char *message = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(error object is not a string)";
    fprintf(stderr, "mqlite: fatal: unprotected Lua error: %s\n", message);
    fflush(stderr);
    abort();
    return 0;
}

/// A new state whose allocations count against `memory_limit` bytes (enforced while Lua code
/// runs) and whose calls (mqlite_call) may run `instruction_limit` VM instructions, with the
/// panic handler above. `c` must outlive the state. NULL if there is no memory at all.
static inline lua_State *mqlite_newstate(mqlite_control *c, size_t memory_limit, long long instruction_limit) {
    memset(c, 0, sizeof *c);
    c->limit = memory_limit;
    c->instruction_limit = instruction_limit > 0 ? instruction_limit : 1;
    lua_State *L = lua_newstate(mqlite_alloc, c);
    if (L) lua_atpanic(L, mqlite_panic);
    return L;
}

static inline size_t mqlite_memory_used(const mqlite_control *c) { return c->used; }
static inline int mqlite_memory_limit(lua_State *L) { size_t limit = mqlite_control_of(L)->limit; return limit > INT_MAX ? INT_MAX : (int)limit; }

/// Counts one more action of the running call (`bytes` of payload it copies out of Lua): 0 once
/// past MQLITE_MAX_ACTIONS, or past `memory_limit` bytes in all.
static inline int mqlite_take_action(lua_State *L, size_t bytes) {
    mqlite_control *c = (mqlite_control *)mqlite_control_of(L);
    c->actions += 1;
    c->action_bytes += bytes;
    return c->actions <= MQLITE_MAX_ACTIONS && c->action_bytes <= c->limit;
}
static inline size_t mqlite_memory_remaining(const mqlite_control *c) { return c->used >= c->limit ? 0 : c->limit - c->used; }

/* The watchdog's side (another thread). */
static inline unsigned long mqlite_calls(mqlite_control *c) { return __atomic_load_n(&c->calls, __ATOMIC_ACQUIRE); }
static inline void mqlite_expire(mqlite_control *c, unsigned long call) { __atomic_store_n(&c->expired, call, __ATOMIC_RELEASE); }
static inline void mqlite_stop(mqlite_control *c) { __atomic_store_n(&c->stopping, 1, __ATOMIC_RELEASE); }

static inline int mqlite_stopping(mqlite_control *c) { return __atomic_load_n(&c->stopping, __ATOMIC_ACQUIRE); }

/// Whether the running call must end now: the watchdog found it over the time limit, or the
/// broker is stopping. (Only the worker writes `calls`, so it reads it plainly.)
static inline int mqlite_overdue(mqlite_control *c) {
    return ((c->calls & 1) && __atomic_load_n(&c->expired, __ATOMIC_ACQUIRE) == c->calls) || mqlite_stopping(c);
}

static void mqlite_limit_hook(lua_State *L, lua_Debug *ar);

/// Raises the error of a call that hit a limit, and makes every following instruction of this
/// call (in this thread: a coroutine's hook is its own) raise it again, so that a pcall or
/// coroutine.resume in the script cannot catch it and carry on: each catching frame returns to
/// Lua code that fails at its next instruction, until the error leaves the hook call.
static int mqlite_limit_error(lua_State *L, mqlite_control *c, const char *message) {
    c->exhausted = 1;
    lua_sethook(L, mqlite_limit_hook, LUA_MASKCOUNT, 1);
    return luaL_error(L, "%s", message);
}

static int mqlite_overdue_error(lua_State *L, mqlite_control *c) {
    return mqlite_limit_error(L, c, mqlite_stopping(c) ? "stopped: the broker is shutting down" : "time limit exceeded");
}

/// Runs every `step` VM instructions during a call: the instruction budget, and the clock through
/// the watchdog's flag (an atomic load; no clock read here).
static void mqlite_limit_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    mqlite_control *c = mqlite_control_of(L);
    if (c->exhausted) mqlite_limit_error(L, c, "limit exceeded (caught and ignored by the script)");
    if (mqlite_overdue(c)) mqlite_overdue_error(L, c);
    c->remaining -= c->step;
    if (c->remaining <= 0) mqlite_limit_error(L, c, "instruction limit exceeded");
    if (c->remaining < c->step) {
        c->step = (int)c->remaining;
        lua_sethook(L, mqlite_limit_hook, LUA_MASKCOUNT, c->step);
    }
}

#define MQLITE_MEMORY_ERROR "not enough memory (memory_limit)"

/// Whether the state is over its memory budget after a full collection. Host code overdraws the
/// budget (see above): a string it hands to Lua (a hook's payload, a mqlite.kv value) that the
/// script keeps in a table slot it already has allocates nothing the budget would refuse, so a
/// script could hoard such strings past any limit. Checked before a call starts (its arguments
/// pushed) and after each host function (its results pushed).
static int mqlite_over_budget(lua_State *L, mqlite_control *c) {
    if (c->used <= c->limit) return 0;
    lua_gc(L, LUA_GCCOLLECT);
    return c->used > c->limit;
}

/// lua_pcall under the limits: the instruction budget, the memory budget (enforced only for the
/// duration of the call), and the time limit (the watchdog sees the odd call count). A state
/// over its budget with the call's arguments pushed does not run it (LUA_ERRMEM).
static inline int mqlite_call(lua_State *L, int nargs, int nresults) {
    mqlite_control *c = mqlite_control_of(L);
    if (mqlite_over_budget(L, c)) {
        lua_settop(L, lua_gettop(L) - nargs - 1);
        lua_pushliteral(L, MQLITE_MEMORY_ERROR);
        return LUA_ERRMEM;
    }
    c->remaining = c->instruction_limit;
    c->exhausted = 0;
    c->actions = 0;
    c->action_bytes = 0;
    c->step = c->instruction_limit < MQLITE_HOOK_STEP ? (int)c->instruction_limit : MQLITE_HOOK_STEP;
    lua_sethook(L, mqlite_limit_hook, LUA_MASKCOUNT, c->step);
    __atomic_store_n(&c->calls, c->calls + 1, __ATOMIC_RELEASE);  /* odd: running */
    int base = lua_gettop(L) - nargs - 1;
    c->enforce = 1;
    int status = lua_pcall(L, nargs, nresults, 0);
    c->enforce = 0;
    __atomic_store_n(&c->calls, c->calls + 1, __ATOMIC_RELEASE);  /* even: idle */
    lua_sethook(L, NULL, 0, 0);
    if (status == LUA_OK && c->exhausted) {
        /* A limit was hit in a coroutine of the script, whose resume caught the error: the call
           still fails, as the limit's documentation says. */
        lua_settop(L, base);
        lua_pushstring(L, "limit exceeded (caught and ignored by the script)");
        status = LUA_ERRRUN;
    }
    return status;
}

/// lua_resume under the same limits, for a hook run as a coroutine (`co`, a thread of `from`):
/// the call may yield (mqlite.http.request) and be resumed later, each part counted by the
/// watchdog as a call of its own (the time spent waiting is not Lua's). The instruction budget
/// goes on across the parts: `*remaining` is what is left, updated when the part ends.
static inline int mqlite_resume(lua_State *from, lua_State *co, int nargs, int *nresults, long long *remaining) {
    mqlite_control *c = mqlite_control_of(co);
    if (mqlite_over_budget(co, c)) {
        lua_settop(co, lua_gettop(co) - nargs);
        lua_pushliteral(co, MQLITE_MEMORY_ERROR);
        *nresults = 0;
        return LUA_ERRMEM;
    }
    c->remaining = *remaining;
    c->exhausted = 0;
    c->actions = 0;
    c->action_bytes = 0;
    c->step = c->remaining < MQLITE_HOOK_STEP ? (int)(c->remaining > 0 ? c->remaining : 1) : MQLITE_HOOK_STEP;
    lua_sethook(co, mqlite_limit_hook, LUA_MASKCOUNT, c->step);
    __atomic_store_n(&c->calls, c->calls + 1, __ATOMIC_RELEASE);  /* odd: running */
    c->enforce = 1;
    int status = lua_resume(co, from, nargs, nresults);
    c->enforce = 0;
    __atomic_store_n(&c->calls, c->calls + 1, __ATOMIC_RELEASE);  /* even: idle */
    lua_sethook(co, NULL, 0, 0);
    *remaining = c->remaining;
    if (status == LUA_OK && c->exhausted) {
        /* As in mqlite_call: a limit error the script caught still fails the call. */
        lua_pop(co, *nresults);
        lua_pushstring(co, "limit exceeded (caught and ignored by the script)");
        *nresults = 0;
        status = LUA_ERRRUN;
    }
    return status;
}

/// A Swift function callable from Lua. It returns the number of results it pushed, -1 after
/// pushing an error message (the C trampoline then raises the Lua error, outside Swift frames),
/// or MQLITE_YIELD after starting something the hook waits for: the trampoline yields, and the
/// values the host resumes the coroutine with are the function's results.
typedef int (*mqlite_swift_function)(lua_State *L);

#define MQLITE_YIELD (-2)

/// After a host or library function inside a call: the time limit (the count hook sees it only
/// every MQLITE_HOOK_STEP instructions, and a loop of slow calls, a password hash or a full
/// collection each, is few instructions) and the memory budget (`mqlite_over_budget`).
static void mqlite_check_limits(lua_State *L, mqlite_control *c) {
    if (!c->enforce) return;  /* not in a call */
    if (mqlite_overdue(c)) mqlite_overdue_error(L, c);
    if (mqlite_over_budget(L, c)) mqlite_limit_error(L, c, MQLITE_MEMORY_ERROR);
}

static int mqlite_trampoline(lua_State *L) {
    mqlite_swift_function fn = (mqlite_swift_function)lua_touserdata(L, lua_upvalueindex(1));
    mqlite_control *c = mqlite_control_of(L);
    /* No budget while Swift runs, so that no allocation fails in a Swift frame (see above). */
    int enforce = c->enforce;
    c->enforce = 0;
    int results = fn(L);
    c->enforce = enforce;
    if (results == MQLITE_YIELD) return lua_yield(L, 0);
    if (results < 0) return lua_error(L);
    mqlite_check_limits(L, c);
    return results;
}

/// Pushes `fn` as a Lua function; `owner` (the Swift object that serves it) is its second upvalue.
static inline void mqlite_pushfunction(lua_State *L, mqlite_swift_function fn, void *owner) {
    lua_pushlightuserdata(L, (void *)fn);
    lua_pushlightuserdata(L, owner);
    lua_pushcclosure(L, mqlite_trampoline, 2);
}

/// The `owner` of the running Swift function (call only from inside one).
static inline void *mqlite_owner(lua_State *L) { return lua_touserdata(L, lua_upvalueindex(2)); }

/// setmetatable without finalizers: a metatable holding __gc is refused. Finalizers run whenever
/// the collector does, also inside host (Swift) code and lua_close, outside every limit. (A __gc
/// added to a metatable after setmetatable does not mark the object: Lua 5.4 manual, 2.5.3.)
/// Upvalue 1 is Lua's own setmetatable.
static int mqlite_setmetatable(lua_State *L) {
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL) return luaL_error(L, "setmetatable: __gc (finalizers) is not available to plugins");
        lua_pop(L, 1);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/// Replaces the global setmetatable with the one above.
static inline void mqlite_guard_setmetatable(lua_State *L) {
    lua_getglobal(L, "setmetatable");
    lua_pushcclosure(L, mqlite_setmetatable, 1);
    lua_setglobal(L, "setmetatable");
}

/// collectgarbage, then the call's limits (`mqlite_check_limits`): a full collection of a large
/// state takes long, in one instruction. Upvalue 1 is Lua's own.
static int mqlite_collectgarbage(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    mqlite_control *c = mqlite_control_of(L);
    if (c->enforce && mqlite_overdue(c)) mqlite_overdue_error(L, c);
    return lua_gettop(L);
}

static inline void mqlite_guard_collectgarbage(lua_State *L) {
    lua_getglobal(L, "collectgarbage");
    lua_pushcclosure(L, mqlite_collectgarbage, 1);
    lua_setglobal(L, "collectgarbage");
}

/* ---------------------------------------------------------------------------------------------
 * Hook calls run as coroutines of the host's, marked in a registry table with weak keys. A script
 * can get the one it runs in (coroutine.running()); coroutine.resume and coroutine.close refuse
 * those threads, since resuming a hook waiting on an HTTP answer would hand it a forged answer.
 * ------------------------------------------------------------------------------------------- */
#define MQLITE_HOOK_THREADS "mqlite.hookthreads"

static int mqlite_call_original(lua_State *L);

static int mqlite_guarded_coroutine_op(lua_State *L) {
    if (lua_type(L, 1) == LUA_TTHREAD) {
        lua_getfield(L, LUA_REGISTRYINDEX, MQLITE_HOOK_THREADS);
        lua_pushvalue(L, 1);
        int marked = lua_rawget(L, -2) != LUA_TNIL;
        lua_pop(L, 2);
        if (marked) return luaL_error(L, "a hook's own coroutine cannot be resumed or closed by a script");
    }
    return mqlite_call_original(L);
}

/// Makes the marks table and wraps coroutine.resume and coroutine.close (call once, after the
/// coroutine library is open).
static inline void mqlite_guard_coroutines(lua_State *L) {
    lua_newtable(L);
    lua_newtable(L);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, MQLITE_HOOK_THREADS);
    lua_getglobal(L, "coroutine");
    static const char *const names[] = {"resume", "close"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        lua_getfield(L, -1, names[i]);
        lua_pushcclosure(L, mqlite_guarded_coroutine_op, 1);
        lua_setfield(L, -2, names[i]);
    }
    lua_pop(L, 1);
}

/* xpcall whose message handler runs once the failed call has unwound, as an ordinary call of the
 * script's, under its limits (in a protected call of its own). Lua runs the handler at the point
 * of the error: for a limit's error, raised from the count hook, that is inside the hook, where
 * Lua turns hooks off, so a handler that looped (or merely took long) ran with no instruction
 * count and no watchdog, and held its worker for good. The results are as xpcall's: true and the
 * function's results, or false and what the handler returned; the function may yield
 * (mqlite.http.request), the handler may not. */
static int mqlite_xpcall_done(lua_State *L, int status, lua_KContext extra) {
    if (status == LUA_OK || status == LUA_YIELD) return lua_gettop(L) - (int)extra;
    lua_pushvalue(L, 2);   /* the handler, */
    lua_insert(L, -2);     /* below the error */
    /* An error in the handler is answered as Lua answers it (LUA_ERRERR). A limit's error is
       raised again by the next instruction the script runs. */
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        lua_pop(L, 1);
        lua_pushliteral(L, "error in error handling");
    }
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
}

/* As Lua's own (lbaselib.c): the handler and `true` go below the function and its arguments, so
   that nothing is pushed per argument (a C function may only count on LUA_MINSTACK slots). */
static int mqlite_xpcall(lua_State *L) {
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushboolean(L, 1);  /* the first result, if the call succeeds */
    lua_pushvalue(L, 1);    /* the function */
    lua_rotate(L, 3, 2);    /* both below the function's arguments */
    return mqlite_xpcall_done(L, lua_pcallk(L, n - 2, LUA_MULTRET, 0, 2, mqlite_xpcall_done), 2);
}

static inline void mqlite_guard_xpcall(lua_State *L) {
    lua_pushcfunction(L, mqlite_xpcall);
    lua_setglobal(L, "xpcall");
}

/// Marks the thread at `index` as a hook call's own.
static inline void mqlite_mark_hook_thread(lua_State *L, int index) {
    index = lua_absindex(L, index);
    lua_getfield(L, LUA_REGISTRYINDEX, MQLITE_HOOK_THREADS);
    lua_pushvalue(L, index);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

/* ---------------------------------------------------------------------------------------------
 * Pattern functions with bounded work. Lua's matcher (lstrlib) runs no VM instructions and calls
 * no hooks, so neither the instruction limit nor the watchdog can stop it, and a backtracking
 * pattern costs up to n^(q+1) steps on a subject of n bytes with q quantifiers (".-.-b" on 20,000
 * bytes: hours). string.find, match, gmatch and gsub are wrapped so that each run of Lua's matcher
 * has a bounded worst case:
 *  - the worst case of one match attempt is estimated from the pattern: a factor n+1 for each
 *    * + - quantifier, %b and back-reference, 2 for each ?; a search tries n+1 start positions
 *    unless the pattern is anchored with ^;
 *  - find and match, when the whole search could cost more than MQLITE_PATTERN_BUDGET, try one
 *    start position at a time (the pattern anchored there, which gives exactly the unanchored
 *    result), checking the time limit between them;
 *  - a run that could still cost more than the budget (for find and match one attempt, for gmatch
 *    and gsub the whole search) fails with "pattern too complex" before it starts.
 * ------------------------------------------------------------------------------------------- */
#define MQLITE_PATTERN_BUDGET 1e7

/// Skips a set `[...]` starting at p[i] == '['; returns the index after its ']'.
static size_t mqlite_skip_set(const char *p, size_t lp, size_t i) {
    i++;
    if (i < lp && p[i] == '^') i++;
    do {
        if (i < lp && p[i] == '%') i++;
        i++;
    } while (i < lp && p[i] != ']');
    return i + 1;
}

/// Worst-case steps of one match attempt of `p` (from index `i`) on `n` bytes.
static double mqlite_attempt_cost(const char *p, size_t lp, size_t i, double n) {
    double cost = 1;
    while (i < lp) {
        int single = 1;  /* a single-character item, which a quantifier may follow */
        if (p[i] == '%' && i + 1 < lp) {
            char k = p[i + 1];
            if (k == 'b') {
                cost *= n + 1;
                i += 4;
                single = 0;
            } else if (k == 'f') {
                i += 2;
                if (i < lp && p[i] == '[') i = mqlite_skip_set(p, lp, i);
                single = 0;
            } else if (k >= '0' && k <= '9') {
                cost *= n + 1;
                i += 2;
                single = 0;
            } else {
                i += 2;
            }
        } else if (p[i] == '[') {
            i = mqlite_skip_set(p, lp, i);
        } else if (p[i] == '(' || p[i] == ')') {
            i++;
            single = 0;
        } else {
            i++;
        }
        if (single && i < lp) {
            if (p[i] == '*' || p[i] == '+' || p[i] == '-') {
                cost *= n + 1;
                i++;
            } else if (p[i] == '?') {
                cost *= 2;
                i++;
            }
        }
        if (cost > 1e300) return 1e300;
    }
    return cost;
}

/// Whether `p` holds a pattern special character (the whole length: a pattern may hold '\0').
static int mqlite_has_specials(const char *p, size_t lp) {
    for (size_t i = 0; i < lp; i++) {
        if (p[i] != '\0' && strchr("^$*+?.([%-", p[i]) != NULL) return 1;
    }
    return 0;
}

static int mqlite_too_complex(lua_State *L, size_t n) {
    return luaL_error(L, "pattern too complex for a subject of %d bytes (see PLUGINS.md, Patterns)", (int)n);
}

/// Calls upvalue 1 (Lua's own function) with this call's arguments.
static int mqlite_call_original(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/// string.find (find = 1) and string.match (find = 0).
static int mqlite_find_aux(lua_State *L, int find) {
    size_t ls, lp;
    luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    lua_Integer init = luaL_optinteger(L, 3, 1);
    if (init < 0) init = -init > (lua_Integer)ls ? 1 : (lua_Integer)ls + init + 1;
    else if (init == 0) init = 1;
    if (init > (lua_Integer)ls + 1) return mqlite_call_original(L);
    if (find && (lua_toboolean(L, 4) || !mqlite_has_specials(p, lp))) return mqlite_call_original(L);  /* plain */
    double n = (double)ls - (double)init + 1;
    int anchored = lp > 0 && p[0] == '^';
    double attempt = mqlite_attempt_cost(p, lp, anchored ? 1 : 0, n);
    if (attempt > MQLITE_PATTERN_BUDGET) return mqlite_too_complex(L, ls);
    if (anchored || attempt * (n + 1) <= MQLITE_PATTERN_BUDGET) return mqlite_call_original(L);
    /* One start position at a time, the pattern anchored there. */
    mqlite_control *c = mqlite_control_of(L);
    lua_settop(L, 2);
    lua_pushliteral(L, "^");
    lua_pushvalue(L, 2);
    lua_concat(L, 2);  /* 3: the anchored pattern */
    for (lua_Integer start = init; start <= (lua_Integer)ls + 1; start++) {
        if (c->exhausted || mqlite_overdue(c)) return mqlite_overdue_error(L, c);
        lua_pushvalue(L, lua_upvalueindex(1));
        lua_pushvalue(L, 1);
        lua_pushvalue(L, 3);
        lua_pushinteger(L, start);
        lua_call(L, 3, LUA_MULTRET);
        if (!lua_isnil(L, 4)) return lua_gettop(L) - 3;
        lua_settop(L, 3);
    }
    luaL_pushfail(L);
    return 1;
}

static int mqlite_str_find(lua_State *L) { return mqlite_find_aux(L, 1); }
static int mqlite_str_match(lua_State *L) { return mqlite_find_aux(L, 0); }

/// string.gmatch (gsub = 0) and string.gsub (gsub = 1): the whole search must fit the budget.
/// (In gmatch a leading '^' is no anchor: every start position is tried.)
static int mqlite_search_all(lua_State *L, int gsub) {
    size_t ls, lp;
    luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    double n = (double)ls;
    int anchored = gsub && lp > 0 && p[0] == '^';
    double cost = mqlite_attempt_cost(p, lp, anchored ? 1 : 0, n) * (anchored ? 1 : n + 1);
    if (cost > MQLITE_PATTERN_BUDGET) return mqlite_too_complex(L, ls);
    return mqlite_call_original(L);
}

static int mqlite_str_gmatch(lua_State *L) { return mqlite_search_all(L, 0); }
static int mqlite_str_gsub(lua_State *L) { return mqlite_search_all(L, 1); }

/// Replaces find, match, gmatch and gsub in the string table at `index` (which is also the string
/// metatable's __index, so s:find(...) uses them too) with the bounded versions.
static inline void mqlite_bound_patterns(lua_State *L, int index) {
    static const struct { const char *name; lua_CFunction fn; } wrappers[] = {
        {"find", mqlite_str_find}, {"match", mqlite_str_match}, {"gmatch", mqlite_str_gmatch}, {"gsub", mqlite_str_gsub},
    };
    index = lua_absindex(L, index);
    for (size_t i = 0; i < sizeof wrappers / sizeof wrappers[0]; i++) {
        lua_getfield(L, index, wrappers[i].name);
        lua_pushcclosure(L, wrappers[i].fn, 1);
        lua_setfield(L, index, wrappers[i].name);
    }
}

#endif

// Lua 5.4 (Debian's liblua5.4-dev) for Swift: the headers, plus static inline wrappers for the
// lua.h macros Swift cannot import, and the two places where Lua errors are raised from C so
// that a longjmp never crosses a Swift frame.
#ifndef MQLITE_CLUA_SHIM_H
#define MQLITE_CLUA_SHIM_H

#include <lua5.4/lua.h>
#include <lua5.4/lauxlib.h>
#include <lua5.4/lualib.h>

static inline int mqlite_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline int mqlite_upvalueindex(int i) { return lua_upvalueindex(i); }
static inline void mqlite_pop(lua_State *L, int n) { lua_pop(L, n); }
static inline void mqlite_newtable(lua_State *L) { lua_newtable(L); }
static inline int mqlite_pcall(lua_State *L, int nargs, int nresults, int msgh) {
    return lua_pcall(L, nargs, nresults, msgh);
}
static inline int mqlite_loadstring(lua_State *L, const char *chunk, size_t length, const char *name) {
    return luaL_loadbufferx(L, chunk, length, name, "t");
}

/// Generational garbage collection: hook calls leave short-lived tables behind, which is what
/// it is made for. (lua_gc is variadic, so Swift cannot call it directly.)
static inline void mqlite_gc_generational(lua_State *L) { lua_gc(L, LUA_GCGEN, 0, 0); }

/// A Swift function callable from Lua. It returns the number of results it pushed, or -1 after
/// pushing an error message: the C trampoline then raises the Lua error, outside Swift frames.
typedef int (*mqlite_swift_function)(lua_State *L);

static int mqlite_trampoline(lua_State *L) {
    mqlite_swift_function fn = (mqlite_swift_function)lua_touserdata(L, lua_upvalueindex(1));
    int results = fn(L);
    if (results < 0) return lua_error(L);
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

static void mqlite_count_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    luaL_error(L, "instruction limit exceeded");
}

/// Makes the next calls fail once they run `limit` VM instructions (0 = no limit). Setting it
/// again restarts the count, so call it before each protected call.
static inline void mqlite_set_instruction_limit(lua_State *L, int limit) {
    if (limit > 0) {
        lua_sethook(L, mqlite_count_hook, LUA_MASKCOUNT, limit);
    } else {
        lua_sethook(L, NULL, 0, 0);
    }
}

#endif

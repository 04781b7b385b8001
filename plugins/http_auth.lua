-- http_auth.lua: authentication and access rules from an HTTP service (as EMQX's and VerneMQ's
-- HTTP auth plugins).
--
-- options:
--   url = "http://127.0.0.1:8080/mqtt/auth"   required: POSTed once per CONNECT
--   acl_url = "http://127.0.0.1:8080/mqtt/acl" optional: POSTed once per accepted client; its JSON
--                                             answer is the client's access rules
--   timeout = 2                               seconds per request
--   cache = 0                                 seconds a "yes" is remembered (mqlite.kv; 0 = never)
--
-- The auth request's body is JSON: {"client_id", "username", "password", "address", "listener"}.
-- The service answers 200 to accept, 401 or 403 to refuse (CONNACK 5); any other status is an
-- error. The ACL request's body is {"client_id", "username", "address"}; a 200 answer holds
-- {"publish": [filters], "subscribe": [filters], "deny": [filters]} (on_authorize's table),
-- 204 means no restriction.
--
-- A request that fails (timeout, connection refused, an unexpected status) is an error of the
-- hook: `[scripting] on_error` decides ("deny", the default, refuses the client). The worker goes
-- on serving every other client while a request is out; `[scripting] max_pending_calls` bounds
-- how many wait at once on each worker.

local url = mqlite.options.url
local acl_url = mqlite.options.acl_url
local timeout = mqlite.options.timeout or 2
local cache = mqlite.options.cache or 0
assert(type(url) == "string", "options.url must be set to the auth service's URL")
assert(acl_url == nil or type(acl_url) == "string", "options.acl_url must be a string")
assert(type(timeout) == "number" and timeout > 0, "options.timeout must be a number of seconds")
assert(type(cache) == "number" and cache >= 0, "options.cache must be a number of seconds")

local function post(target, fields)
  local status, body = mqlite.http.request{
    method = "POST", url = target, timeout = timeout,
    headers = { ["content-type"] = "application/json" },
    body = mqlite.json.encode(fields),
  }
  if not status then error(body, 0) end  -- nil and the message: timeout, refused, ...
  return status, body
end

local function cache_key(c)
  -- The password is part of the key (hashed): a "yes" for one password is not one for another.
  return "http_auth:" .. mqlite.sha256((c.username or "") .. "\0" .. c.client_id .. "\0" .. (c.password or ""))
end

mqlite.on_connect(function(c)
  if cache > 0 and mqlite.kv.get(cache_key(c)) then return true end
  local status = post(url, {
    client_id = c.client_id, username = c.username, password = c.password,
    address = c.address, listener = c.listener,
  })
  if status == 200 then
    if cache > 0 then mqlite.kv.set(cache_key(c), true, cache) end
    return true
  end
  if status == 401 or status == 403 then return false, 5 end
  error("auth service answered " .. status)
end)

if acl_url then
  mqlite.on_authorize(function(c)
    local status, body = post(acl_url, { client_id = c.client_id, username = c.username, address = c.address })
    if status == 204 then return nil end
    if status ~= 200 then error("ACL service answered " .. status) end
    local rules, problem = mqlite.json.decode(body)
    if type(rules) ~= "table" then error("ACL service answer is not a JSON object: " .. tostring(problem)) end
    return { publish = rules.publish, subscribe = rules.subscribe, deny = rules.deny }
  end)
end

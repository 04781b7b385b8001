-- http_auth.lua: authentication, and access rules, from an HTTP service (the shape of Mosquitto's
-- go-auth HTTP backend and EMQX's HTTP auth).
--
-- options:
--   url = "http://127.0.0.1:8080/mqtt/auth"   required: POSTed once per CONNECT
--   timeout = 2                               seconds per request
--   cache_ttl = 0                             seconds an answer is remembered (mqlite.kv; 0 = never)
--
-- The request's body is JSON: {"client_id", "username", "password", "address", "listener"}.
-- The service answers:
--   200          accept; an empty body means no restriction, else the body must be a JSON object
--                {"publish": [filters], "subscribe": [filters], "deny": [filters]}: the client's
--                ACL (as on_authorize's table; %c and %u work), in which a list left out is empty
--                (the client may do only what the answer lists) and any other key denies it
--                everything;
--   401 or 403   refuse (CONNACK 5);
--   anything else, or no answer (timeout, connection refused): an error of the hook, and
--                `[scripting] on_error` decides ("deny", the default, refuses the client).
-- The worker goes on serving every other client while a request is out; `[scripting]
-- max_pending_calls` bounds how many wait at once on each worker. Admissions are cached by a
-- hash of the client id and credentials (refusals are not: any client could fill the cache). A password that is not UTF-8 (MQTT passwords are bytes) cannot
-- go in the JSON request: that client is refused (CONNACK 4) without asking, whatever `on_error`
-- says (the service did not fail; a client must not be able to make it look as if it had).

local url = mqlite.options.url
local timeout = mqlite.options.timeout or 2
local cache_ttl = mqlite.options.cache_ttl or 0
assert(type(url) == "string", "options.url must be set to the auth service's URL")
assert(type(timeout) == "number" and timeout > 0, "options.timeout must be a number of seconds")
assert(type(cache_ttl) == "number" and cache_ttl >= 0, "options.cache_ttl must be a number of seconds")

-- What the service said of a client (its ACL as JSON, "" for none), so that on_authorize can
-- run again (a reload, mqlite.reauthorize) without asking. Keyed by a hash of client id and
-- address (a client id may be 64 KiB; a takeover's old connection, going away, must not take the
-- new one's entry with it). Kept a minute from CONNECT (a client refused after on_connect never
-- connects), 30 days once connected, deleted when it disconnects; a client whose entry is gone
-- gets no rights at a later re-check.
local function acl_key(c) return "http_auth:acl:" .. mqlite.sha256(c.client_id .. "\0" .. c.address) end
local ACL_UNTIL_CONNECTED = 60
local ACL_KEEP = 30 * 86400

local function cache_key(c)
  return "http_auth:auth:" .. mqlite.sha256(c.client_id .. "\0" .. (c.username or "") .. "\0" .. (c.password or ""))
end

local function ask(c)
  local status, body = mqlite.http.request{
    method = "POST", url = url, timeout = timeout,
    headers = { ["content-type"] = "application/json" },
    body = mqlite.json.encode({
      client_id = c.client_id, username = c.username, password = c.password,
      address = c.address, listener = c.listener,
    }),
  }
  if not status then error(body, 0) end  -- nil and the message: timeout, refused, ...
  if status == 200 then
    if body ~= "" then
      local rules, problem = mqlite.json.decode(body)
      if type(rules) ~= "table" or not body:find("^%s*{") then
        error("auth service's answer is not a JSON object: " .. tostring(problem or body:sub(1, 40)), 0)
      end
    end
    return body
  end
  if status == 401 or status == 403 then return false end
  error("auth service answered " .. status, 0)
end

mqlite.on_connect(function(c)
  if c.password and not utf8.len(c.password) then return false, 4 end
  local answer = cache_ttl > 0 and mqlite.kv.get(cache_key(c)) or nil
  if answer == nil then
    answer = ask(c)
    -- Admissions only: refusals cached would let clients with wrong passwords fill mqlite.kv
    -- (kv_max_bytes) until admitted clients could no longer be. A full cache is no error.
    if cache_ttl > 0 and answer ~= false then pcall(mqlite.kv.set, cache_key(c), answer, cache_ttl) end
  end
  if answer == false then return false end
  mqlite.kv.set(acl_key(c), answer, ACL_UNTIL_CONNECTED)
  return true
end)

mqlite.on_connected(function(c)
  local body = mqlite.kv.get(acl_key(c))
  if body ~= nil then mqlite.kv.set(acl_key(c), body, ACL_KEEP) end
end)

mqlite.on_authorize(function(c)
  local body = mqlite.kv.get(acl_key(c))
  if body == nil then return { publish = {}, subscribe = {} } end  -- not admitted here: nothing
  if body == "" then return nil end
  -- The service's table as it is (the broker denies everything for a key it does not know), with
  -- the lists it left out empty.
  local rules = mqlite.json.decode(body)
  rules.publish = rules.publish or {}
  rules.subscribe = rules.subscribe or {}
  return rules
end)

mqlite.on_disconnected(function(c)
  mqlite.kv.delete(acl_key(c))
end)

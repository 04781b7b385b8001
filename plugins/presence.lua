-- presence.lua: device presence without wills.
--
-- options:
--   topic = "presence/%c"   where each client's state goes (%c = client id, %u = user name;
--                           a client without a user name gets "" for %u)
--   qos = 1                 QoS of the presence messages
--
-- When a client has connected, the broker publishes a retained "online" to its topic; when its
-- connection ends (DISCONNECT, a lost connection, a takeover, a kick), a retained "offline".
-- Back ends subscribe to presence/# and always see the last state of every device, whether or
-- not the devices set a will. A client id (or, with %u, a user name) that cannot form a topic
-- (one with "+", "#" or "/") is not published; the failure is logged.

local pattern = mqlite.options.topic or "presence/%c"
local qos = mqlite.options.qos or 1
assert(type(pattern) == "string", "options.topic must be a string")

local uses_username = pattern:find("%%u") ~= nil

local function topic(c)
  -- One pass, plain substitutions: a client id with "%u" in it is not read as a user name (a
  -- client named "%u" would publish another client's presence), nor "%" as a pattern.
  return (pattern:gsub("%%([cu])", function(k)
    if k == "c" then return c.client_id end
    return c.username or ""
  end))
end

local function invalid(c)
  return c.client_id:find("[+#/]") ~= nil or (uses_username and (c.username or ""):find("[+#/]") ~= nil)
end

mqlite.on_connected(function(c)
  if invalid(c) then error("client id or user name cannot form a presence topic") end
  mqlite.publish(topic(c), "online", qos, true)
end)

mqlite.on_disconnected(function(c)
  if invalid(c) then return end
  mqlite.publish(topic(c), "offline", qos, true)
end)

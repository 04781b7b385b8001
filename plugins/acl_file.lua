-- acl_file.lua: Mosquitto acl_file access control, enforced natively by the broker.
--
-- options:
--   acl_file = "acl"   the file, relative to the config file's folder, in Mosquitto's format:
--
--     # topic lines before any "user" line apply to clients without a user name
--     topic read public/#
--     user alice
--     topic readwrite alice/#        (access is read, write, readwrite or deny; default readwrite)
--     topic deny alice/secret/#
--     pattern write devices/%c/#      (patterns apply to every client; %c = client id, %u = user name)
--
-- read governs SUBSCRIBE (a filter must lie within a readable pattern), write governs PUBLISH.
-- deny lines deny both, whatever else allows: a PUBLISH to a denied topic is dropped, a SUBSCRIBE
-- wholly inside a denied pattern is refused, and, as in Mosquitto, a wider subscription is
-- allowed but messages on denied topics are not delivered to it. A client with no matching lines
-- may do nothing. The rules are handed to the broker once per connection (on_authorize) and
-- matched in Swift on every PUBLISH and SUBSCRIBE, never in Lua. SIGHUP re-reads the file.

local path = mqlite.options.acl_file
assert(type(path) == "string", "options.acl_file is required")
local text, err = mqlite.read_file(path)
assert(text, err)

local function rules()
  return { read = {}, write = {}, deny = {} }
end

local anonymous = rules()
local users = {}
local patterns = rules()
local current = anonymous

local function add(target, access, topic)
  if access == "read" or access == "readwrite" then table.insert(target.read, topic) end
  if access == "write" or access == "readwrite" then table.insert(target.write, topic) end
  if access == "deny" then table.insert(target.deny, topic) end
end

local number = 0
for line in (text .. "\n"):gmatch("(.-)\r?\n") do
  number = number + 1
  line = line:match("^%s*(.-)%s*$")
  if line ~= "" and not line:match("^#") then
    local kind, rest = line:match("^(%S+)%s+(.+)$")
    if kind == "user" then
      users[rest] = users[rest] or rules()
      current = users[rest]
    elseif kind == "topic" or kind == "pattern" then
      local access, topic = rest:match("^(%S+)%s+(.+)$")
      if not (access == "read" or access == "write" or access == "readwrite" or access == "deny") then
        access, topic = "readwrite", rest
      end
      add(kind == "pattern" and patterns or current, access, topic)
    else
      error(("%s:%d: not understood: %s"):format(path, number, line))
    end
  end
end

local function join(a, b)
  local out = {}
  for _, v in ipairs(a) do out[#out + 1] = v end
  for _, v in ipairs(b) do out[#out + 1] = v end
  return out
end

mqlite.on_authorize(function(c)
  local own
  if c.username == nil then
    own = anonymous
  else
    own = users[c.username] or rules()
  end
  return {
    publish = join(own.write, patterns.write),
    subscribe = join(own.read, patterns.read),
    deny = join(own.deny, patterns.deny),
  }
end)

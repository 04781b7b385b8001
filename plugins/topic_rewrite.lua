-- topic_rewrite.lua: a topic-rewriting gateway.
--
-- options:
--   rules = [ { from = "legacy/+/temp", to = "sensors/{1}/temperature" } ]
--
-- A message published to a topic matching `from` is delivered on the topic `to` instead, with
-- {N} replaced by the N-th wildcard level of the match (a "#" captures the rest of the topic,
-- slashes included). Rules are tried in order; the first whose filter matches rewrites.
-- Topics that match no rule never enter Lua.

local rules = mqlite.options.rules or {}

-- With plain finds: a pattern such as "(.-)/" is "too complex" for Lua on topics of a few KB
-- (PLUGINS.md, "Patterns"), and such a topic's message was dropped.
local function split(s)
  local levels, start = {}, 1
  while true do
    local slash = s:find("/", start, true)
    if not slash then
      levels[#levels + 1] = s:sub(start)
      return levels
    end
    levels[#levels + 1] = s:sub(start, slash - 1)
    start = slash + 1
  end
end

local function captures(filter, topic)
  local f, t = split(filter), split(topic)
  local found = {}
  for i, level in ipairs(f) do
    if level == "#" then
      found[#found + 1] = table.concat(t, "/", i)
      break
    elseif level == "+" then
      found[#found + 1] = t[i]
    end
  end
  return found
end

for i, rule in ipairs(rules) do
  assert(type(rule.from) == "string" and type(rule.to) == "string",
    ("rules[%d] needs from and to strings"):format(i))
  mqlite.on_publish(rule.from, function(m)
    local found = captures(rule.from, m.topic)
    local topic = rule.to:gsub("{(%d+)}", function(n)
      return found[tonumber(n)] or ""
    end)
    return { topic = topic }
  end)
end

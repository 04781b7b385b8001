-- json_envelope.lua: wrap payloads in a JSON envelope.
--
-- options:
--   filters = ["telemetry/#"]   topic filters whose messages are wrapped
--
-- A message on a matching topic is delivered with the payload
--   {"client_id": "...", "payload": "<original payload>", "time": <seconds since 1970>, "topic": "..."}
-- on the same topic. A payload that is not UTF-8 text cannot go into JSON: that message is
-- dropped and the failure logged.

local filters = mqlite.options.filters or {}

for _, filter in ipairs(filters) do
  mqlite.on_publish(filter, function(m)
    return {
      payload = mqlite.json.encode({
        time = mqlite.time(),
        client_id = m.client_id,
        topic = m.topic,
        payload = m.payload,
      }),
    }
  end)
end

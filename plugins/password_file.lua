-- password_file.lua: authenticate clients against a Mosquitto password file.
--
-- options:
--   password_file = "passwd"   the file, relative to the config file's folder. Lines are
--                              "user:hash" as mosquitto_passwd writes them ($7$ PBKDF2-SHA512
--                              or $6$ SHA-512); blank lines and lines starting with # are skipped.
--
-- A client that gives a user name must be in the file with the right password. An unknown user
-- and a wrong password both get CONNACK 4 (bad user name or password), so the answer does not
-- tell which user names exist. A client without a user name is left to [auth] allow_anonymous.
-- A client whose user name is its certificate's CN (a TLS listener with use_identity_as_username)
-- is not checked here: the TLS handshake authenticated it, as in Mosquitto.
-- The file is read when the script loads: send SIGHUP to re-read it.

local path = mqlite.options.password_file
assert(type(path) == "string", "options.password_file is required")
local text, err = mqlite.read_file(path)
assert(text, err)

local users = {}
local count = 0
for line in text:gmatch("[^\r\n]+") do
  if not line:match("^%s*#") and line:match("%S") then
    local user, hash = line:match("^([^:]+):(%S+)%s*$")
    assert(user, "password file: malformed line: " .. line)
    users[user] = hash
    count = count + 1
  end
end
mqlite.log("debug", ("password_file: %d users from %s"):format(count, path))

mqlite.on_connect(function(c)
  if c.username == nil or (c.tls and c.tls.use_identity_as_username) then
    return nil
  end
  local hash = users[c.username]
  if hash ~= nil and c.password ~= nil and mqlite.check_password(hash, c.password) then
    return true
  end
  return false, 4
end)

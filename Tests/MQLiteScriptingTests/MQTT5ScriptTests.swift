import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// What scripts see of MQTT 5.0: the protocol version, a message's properties (and changing
/// them), a CONNECT's user properties, and refusals with 5.0 reason codes.
@Suite("Lua: MQTT 5.0")
struct MQTT5ScriptTests {
    @Test("on_connect sees protocol_version and a 5.0 client's user properties; false, code, reason refuses with a 5.0 reason code and reason string (3.1.1 clients get the nearest return code)")
    func connect() async throws {
        let script = """
            mqlite.on_connect(function(c)
              local user = c.properties and c.properties.user or {}
              local seen = c.protocol_version .. ":" .. #user
              for _, p in ipairs(user) do seen = seen .. ":" .. p[1] .. "=" .. p[2] end
              mqlite.kv.set("seen:" .. c.client_id, seen)
              if c.client_id == "banned" then return false, 0x8A, "banned until tomorrow" end
              if c.client_id == "plain-no" then return false, 4 end
              if c.client_id == "bad-code" then return false, 0x10 end
              if c.client_id == "long" then return false, 0x87, string.rep("\\226\\130\\172", 100) end
              return true
            end)
            mqlite.on_connected(function(c) mqlite.kv.set("version:" .. c.client_id, c.protocol_version) end)
            mqlite.on_publish("report", function(m)
              local keys = { "seen:v5", "seen:v3", "version:v5", "version:v3" }
              local out = {}
              for _, k in ipairs(keys) do out[#out + 1] = tostring(mqlite.kv.get(k)) end
              return { payload = table.concat(out, " ") }
            end)
            """
        try await withScripts([script]) { b, _, _ in
            var properties = MQTTProperties()
            properties.userProperties = [UserProperty(name: "site", value: "north"), UserProperty(name: "site", value: "south")]
            let (v5, _) = try await b.client5("v5", properties: properties)
            let v3 = try await b.client("v3")
            try await v3.subscribe("report")
            try await v5.publish("report", "")
            #expect(String(buffer: try await v3.expectPublish().payload) == "5:2:site=north:site=south 4:0 5 4")

            let banned = try await TestClient.open(port: b.port, version: .v5)
            let refused = try await banned.connect(ConnectPacket(protocolLevel: 5, clientID: "banned"))
            #expect(refused.reasonCode == .banned && refused.properties.reasonString == "banned until tomorrow")
            let banned3 = try await TestClient.open(port: b.port)
            #expect(try await banned3.connect(ConnectPacket(clientID: "banned")).returnCode == .notAuthorized)
            let plainNo = try await TestClient.open(port: b.port, version: .v5)
            #expect(try await plainNo.connect(ConnectPacket(protocolLevel: 5, clientID: "plain-no")).reasonCode == .badUserNameOrPassword)
            // Not a CONNACK failure code: the hook failed, which refuses (fail closed by default).
            let bad = try await TestClient.open(port: b.port, version: .v5)
            #expect(try await bad.connect(ConnectPacket(protocolLevel: 5, clientID: "bad-code")).reasonCode.isFailure)
            // A reason string is cut to 256 bytes, at a character's start: 85 euro signs (255 bytes).
            let long = try await TestClient.open(port: b.port, version: .v5)
            #expect(try await long.connect(ConnectPacket(protocolLevel: 5, clientID: "long")).properties.reasonString == String(repeating: "€", count: 85))
        }
    }

    @Test("on_publish and on_deliver see m.properties of a 5.0 message (none for 3.1.1) and may change them: user properties added and removed, content type, response topic, correlation data, payload format, message expiry")
    func properties() async throws {
        let script = """
            local function describe(p)
              if p == nil then return "none" end
              local parts = {}
              for _, u in ipairs(p.user or {}) do parts[#parts + 1] = u[1] .. "=" .. u[2] end
              return table.concat(parts, ",") .. "|" .. tostring(p.content_type) .. "|" .. tostring(p.response_topic)
                .. "|" .. tostring(p.correlation_data) .. "|" .. tostring(p.payload_format) .. "|" .. tostring(p.message_expiry)
            end
            mqlite.on_publish("gw/#", function(m)
              local before = describe(m.properties)
              local p = m.properties or {}
              local user = {}
              for _, u in ipairs(p.user or {}) do if u[1] ~= "secret" then user[#user + 1] = u end end
              user[#user + 1] = { "via", "mqlite" }
              p.user = user
              p.content_type = "text/plain"
              return { payload = before, properties = p }
            end)
            mqlite.on_deliver("gw/#", function(d)
              if d.client_id ~= "strip" then return nil end
              return { properties = {} }
            end)
            mqlite.on_publish("bad/props", function(m) return { properties = { user = { { "a" } } } } end)
            mqlite.on_publish("bad/topic", function(m) return { properties = { response_topic = "a/+" } } end)
            mqlite.on_publish("bad/huge", function(m)
              local user, value = {}, string.rep("v", 1000)
              for i = 1, 1100 do user[i] = { "k", value } end
              return { properties = { user = user } }
            end)
            mqlite.on_publish("bad/meta", function(m)
              return { properties = { user = { setmetatable({ "a", "b" }, { __index = function() return "x" end }) } } }
            end)
            mqlite.on_publish("bad/format", function(m) return { payload = "\\255\\254", properties = { payload_format = 1 } } end)
            mqlite.on_publish("ok/format", function(m) return { payload = "h\\195\\169", properties = { payload_format = 1 } } end)
            """
        try await withScripts([script]) { b, _, _ in
            let (sub, _) = try await b.client5("sub")
            try await sub.subscribe("gw/#")
            let (strip, _) = try await b.client5("strip")
            try await strip.subscribe("gw/#")
            let (pub, _) = try await b.client5("pub")
            var properties = MQTTProperties()
            properties.userProperties = [UserProperty(name: "k", value: "v"), UserProperty(name: "secret", value: "x")]
            properties.responseTopic = "reply/1"
            properties.correlationData = ByteBuffer(string: "c1")
            properties.payloadFormatIndicator = .utf8
            properties.messageExpiryInterval = 60
            pub.send(.publish(PublishPacket(topic: ByteBuffer(string: "gw/a"), payload: ByteBuffer(string: "x"), qos: .atMostOnce, properties: properties)))
            let got = try await sub.expectPublish()
            #expect(String(buffer: got.payload) == "k=v,secret=x|nil|reply/1|c1|1|60")
            #expect(got.properties.userProperties == [UserProperty(name: "k", value: "v"), UserProperty(name: "via", value: "mqlite")])
            #expect(got.properties.contentType == "text/plain" && got.properties.responseTopic == "reply/1")
            #expect(got.properties.correlationData == ByteBuffer(string: "c1") && got.properties.payloadFormatIndicator == .utf8)
            #expect((59...60).contains(got.properties.messageExpiryInterval ?? 0))
            // on_deliver emptied them for one subscriber.
            let stripped = try await strip.expectPublish()
            #expect(stripped.properties.userProperties.isEmpty && stripped.properties.contentType == nil && stripped.properties.messageExpiryInterval == nil)

            // A 3.1.1 publisher's message has no properties; the hook may give it some.
            let old = try await b.client("old")
            try await old.publish("gw/b", "y")
            let fromOld = try await sub.expectPublish()
            #expect(String(buffer: fromOld.payload) == "none")
            #expect(fromOld.properties.userProperties == [UserProperty(name: "via", value: "mqlite")])
            _ = try await strip.expectPublish()

            // Malformed properties from a hook drop the message (as a failing hook does).
            try await sub.subscribe("bad/#")
            try await old.publish("bad/props", "z")
            try await old.publish("bad/topic", "z")
            // Over 1 MiB of properties; a pair with a metatable; a payload marked UTF-8 that is not.
            try await old.publish("bad/huge", "z")
            try await old.publish("bad/meta", "z")
            try await old.publish("bad/format", "z")
            try await sub.expectNothing()
            try await sub.subscribe("ok/#")
            try await old.publish("ok/format", "z")
            let text = try await sub.expectPublish()
            #expect(String(buffer: text.payload) == "hé" && text.properties.payloadFormatIndicator == .utf8)
        }
    }
}

/// `mqlite.on_auth`: MQTT 5 enhanced authentication (AUTH), at CONNECT and re-authenticating.
@Suite("Lua: on_auth (MQTT 5 enhanced authentication)")
struct EnhancedAuthTests {
    /// A toy challenge and response: "hello", then the challenge's answer.
    static let script = """
        mqlite.on_auth("TOY", function(a)
          if a.step == 1 then
            if a.data ~= "hello" then return false, 0x8C, "say hello first" end
            return "continue", "challenge-" .. a.client_id, "s1"
          end
          if a.step == 2 and a.state == "s1" and a.data == "response-" .. a.client_id then
            return true, "welcome" .. (a.reauthenticating and "-again" or "")
          end
          return false, nil, "wrong answer at step " .. a.step
        end)
        """

    static func auth(_ code: ReasonCode, _ method: String = "TOY", data: String?) -> MQTTPacket {
        var properties = MQTTProperties()
        properties.authenticationMethod = method
        properties.authenticationData = data.map { ByteBuffer(string: $0) }
        return .auth(AuthPacket(reasonCode: code, properties: properties))
    }

    static func connect(_ id: String, method: String = "TOY", data: String?) -> ConnectPacket {
        var properties = MQTTProperties()
        properties.authenticationMethod = method
        properties.authenticationData = data.map { ByteBuffer(string: $0) }
        return ConnectPacket(protocolLevel: 5, clientID: id, properties: properties)
    }

    static func expectAuth(_ c: TestClient) async throws -> AuthPacket {
        let packet = try await c.expectPacket()
        guard case .auth(let auth) = packet else { throw TestFailure("expected AUTH, got \(packet)") }
        return auth
    }

    @Test("a challenge and response at CONNECT: AUTH 0x18 both ways, then CONNACK with the method and the hook's data; a re-authentication the same way ends with AUTH 0x00, the client served meanwhile")
    func exchange() async throws {
        try await withScripts([Self.script]) { b, _, _ in
            let c = try await TestClient.open(port: b.port, version: .v5)
            c.send(.connect(Box(Self.connect("c", data: "hello"))))
            let challenge = try await Self.expectAuth(c)
            #expect(challenge.reasonCode == .continueAuthentication && challenge.properties.authenticationMethod == "TOY")
            #expect(challenge.properties.authenticationData == ByteBuffer(string: "challenge-c"))
            c.send(Self.auth(.continueAuthentication, data: "response-c"))
            guard case .connack(let connack) = try await c.expectPacket() else { throw TestFailure("expected CONNACK") }
            #expect(connack.reasonCode == .success && connack.properties.authenticationMethod == "TOY")
            #expect(connack.properties.authenticationData == ByteBuffer(string: "welcome"))
            try await c.ping()

            c.send(Self.auth(.reAuthenticate, data: "hello"))
            #expect(try await Self.expectAuth(c).reasonCode == .continueAuthentication)
            try await c.ping()  // still served while re-authenticating
            c.send(Self.auth(.continueAuthentication, data: "response-c"))
            let done = try await Self.expectAuth(c)
            #expect(done.reasonCode == .success && done.properties.authenticationData == ByteBuffer(string: "welcome-again"))

            // A re-authentication that fails: DISCONNECT 0x87 with the hook's reason.
            c.send(Self.auth(.reAuthenticate, data: "hello"))
            _ = try await Self.expectAuth(c)
            c.send(Self.auth(.continueAuthentication, data: "wrong"))
            var reason = MQTTProperties()
            reason.reasonString = "wrong answer at step 2"
            #expect(try await c.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .notAuthorized, properties: reason))])
        }
    }

    @Test("refusals: a wrong answer gets the hook's code and reason string; a method no hook takes 0x8C; AUTH with another method, out of turn, or without a method at CONNECT is a protocol error; other packets during the exchange close the connection")
    func refusals() async throws {
        try await withScripts([Self.script]) { b, _, _ in
            let wrongHello = try await TestClient.open(port: b.port, version: .v5)
            let refused = try await wrongHello.connect(Self.connect("w", data: "hi"))
            #expect(refused.reasonCode == .badAuthenticationMethod && refused.properties.reasonString == "say hello first")

            let wrong = try await TestClient.open(port: b.port, version: .v5)
            wrong.send(.connect(Box(Self.connect("x", data: "hello"))))
            _ = try await Self.expectAuth(wrong)
            wrong.send(Self.auth(.continueAuthentication, data: "nonsense"))
            guard case .connack(let no) = try await wrong.expectPacket() else { throw TestFailure("expected CONNACK") }
            #expect(no.reasonCode == .notAuthorized && no.properties.reasonString == "wrong answer at step 2")

            let other = try await TestClient.open(port: b.port, version: .v5)
            #expect(try await other.connect(Self.connect("o", method: "SCRAM-SHA-1", data: nil)).reasonCode == .badAuthenticationMethod)

            let switching = try await TestClient.open(port: b.port, version: .v5)
            switching.send(.connect(Box(Self.connect("s", data: "hello"))))
            _ = try await Self.expectAuth(switching)
            switching.send(Self.auth(.continueAuthentication, "OTHER", data: "response-s"))
            _ = try await switching.expectClosed()

            let early = try await TestClient.open(port: b.port, version: .v5)
            early.send(.connect(Box(Self.connect("e", data: "hello"))))
            _ = try await Self.expectAuth(early)
            early.send(.pingreq)
            _ = try await early.expectClosed()

            // Connected without a method: AUTH is a protocol error; so is AUTH 0x18 out of turn.
            let (plain, _) = try await b.client5("plain")
            plain.send(Self.auth(.reAuthenticate, data: "hello"))
            #expect(try await plain.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .protocolError))])
            let c = try await TestClient.open(port: b.port, version: .v5)
            c.send(.connect(Box(Self.connect("c", data: "hello"))))
            _ = try await Self.expectAuth(c)
            c.send(Self.auth(.continueAuthentication, data: "response-c"))
            _ = try await c.expectPacket()  // CONNACK
            c.send(Self.auth(.continueAuthentication, data: "response-c"))
            #expect(try await c.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .protocolError))])
        }
    }

    @Test("what the server sends fits the client's Maximum Packet Size: a refusal's reason string is left out, an AUTH or CONNACK too large even then refuses (0x95); packets sent with the last AUTH, before CONNACK, close the connection unhandled")
    func clientLimits() async throws {
        try await withScripts([Self.script]) { b, _, _ in
            func small(_ id: String, data: String) -> ConnectPacket {
                var connect = Self.connect(id, data: data)
                connect.properties.maximumPacketSize = 20
                return connect
            }
            // CONNACK 0x8C with "say hello first" is 23 bytes: it goes without the reason.
            let wrong = try await TestClient.open(port: b.port, version: .v5)
            let refused = try await wrong.connect(small("w", data: "hi"))
            #expect(refused.reasonCode == .badAuthenticationMethod && refused.properties.reasonString == nil)
            // AUTH with the method and "challenge-t" is 24 bytes.
            let tooSmall = try await TestClient.open(port: b.port, version: .v5)
            #expect(try await tooSmall.connect(small("t", data: "hello")).reasonCode == .packetTooLarge)

            let (sub, _) = try await b.client5("sub")
            try await sub.subscribe("t")
            let eager = try await TestClient.open(port: b.port, version: .v5)
            eager.send(.connect(Box(Self.connect("e", data: "hello"))))
            _ = try await Self.expectAuth(eager)
            var both = ByteBuffer()
            both.writeMQTTPacket(Self.auth(.continueAuthentication, data: "response-e"), version: .v5)
            both.writeMQTTPacket(.publish(PublishPacket(topic: ByteBuffer(string: "t"), payload: ByteBuffer(string: "early"), qos: .atMostOnce)), version: .v5)
            eager.sendRaw(Array(buffer: both))
            _ = try await eager.expectClosed()
            try await sub.expectNothing()
        }
    }

    @Test("an exchange that goes on and on ends after 16 steps, refused (0x87)")
    func boundedSteps() async throws {
        let script = """
            mqlite.on_auth("LOOP", function(a) return "continue", tostring(a.step) end)
            """
        try await withScripts([script]) { b, _, _ in
            let c = try await TestClient.open(port: b.port, version: .v5)
            c.send(.connect(Box(Self.connect("loop", method: "LOOP", data: nil))))
            for step in 1...16 {
                let auth = try await Self.expectAuth(c)
                #expect(auth.properties.authenticationData == ByteBuffer(string: "\(step)"))
                c.send(Self.auth(.continueAuthentication, "LOOP", data: "more"))
            }
            guard case .connack(let connack) = try await c.expectPacket() else { throw TestFailure("expected CONNACK") }
            #expect(connack.reasonCode == .notAuthorized)
        }
    }

    @Test("an exchange the client leaves unanswered ends at connect_timeout")
    func timeout() async throws {
        // (4 s: room for the first step on a loaded machine; a run of the debug build beside the
        // interop tests once took more than 2.)
        try await withScripts([Self.script], configure: { $0.limits.connectTimeout = .seconds(4) }) { b, _, _ in
            let c = try await TestClient.open(port: b.port, version: .v5)
            c.send(.connect(Box(Self.connect("slow", data: "hello"))))
            _ = try await Self.expectAuth(c)
            _ = try await c.expectClosed(timeout: .seconds(10))
        }
    }
}

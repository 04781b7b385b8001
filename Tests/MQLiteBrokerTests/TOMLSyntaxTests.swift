import MQLiteBroker
import Testing
import TOMLKit

/// The TOML syntax check in front of toml++ (TOMLSyntax): what TOML 1.0 allows gets through to
/// TOMLKit, and malformed text is refused before toml++ sees it (some of it failed assertions in
/// toml++ 3.4.0 and aborted the broker: Fuzz/regressions/config/).
@Suite struct TOMLSyntaxTests {
    /// Valid TOML 1.0, much of it from the specification's examples.
    static let valid: [String] = [
        "",
        "   \n\t\n",
        "# only a comment",
        "\u{FEFF}a = 1",
        "a = 1\r\nb = 2\r\n",
        "key = \"value\"\nbare_key = 1\nbare-key = 2\n1234 = 3\n\"127.0.0.1\" = 4\n\"ʎǝʞ\" = 5\n'key2' = 6\n'quoted \"value\"' = 7\n\"\" = 8",
        "name = \"Orange\"\nphysical.color = \"orange\"\nphysical . shape = \"round\"\nsite.\"google.com\" = true\n3.14159 = \"pi\"",
        "str = \"I'm a string. \\\"You can quote me\\\". Name\\tJos\\u00E9\\nLocation\\tSF. \\U0001F600\"",
        "str1 = \"\"\"\nRoses are red\nViolets are blue\"\"\"",
        "str = \"\"\"\nThe quick brown \\\n\n\n  fox jumps over \\\n    the lazy dog.\"\"\"",
        "str = \"\"\"The quick brown \\   \n  fox.\\\n  \"\"\"",
        "str4 = \"\"\"Here are two quotation marks: \"\". Simple enough.\"\"\"\nstr5 = \"\"\"Here are three quotation marks: \"\"\\\".\"\"\"\nstr7 = \"\"\"\"This,\" she said, \"is just a pointless statement.\"\"\"\"",
        "winpath = 'C:\\Users\\nodejs\\templates'\nregex = '<\\i\\c*\\s*>'",
        "regex2 = '''I [dw]on't need \\d{2} apples'''\nlines = '''\nThe first newline is\ntrimmed in raw strings.\n'''\nquot15 = '''Here are fifteen quotation marks: \"\"\"\"\"\"\"\"\"\"\"\"\"\"\"'''\napos15 = \"Here are fifteen apostrophes: '''''''''''''''\"\nstr = ''''That,' she said, 'is still pointless.''''",
        "int1 = +99\nint2 = 42\nint3 = 0\nint4 = -17\nint5 = 1_000\nint6 = 5_349_221\nint8 = 1_2_3_4_5\nhex1 = 0xDEADBEEF\nhex2 = 0xdeadbeef\nhex3 = 0xdead_beef\noct1 = 0o01234567\noct2 = 0o755\nbin1 = 0b11010110\nz = -0\ny = +0",
        "flt1 = +1.0\nflt2 = 3.1415\nflt3 = -0.01\nflt4 = 5e+22\nflt5 = 1e06\nflt6 = -2E-2\nflt7 = 6.626e-34\nflt8 = 224_617.445_991_228\nsf1 = inf\nsf2 = +inf\nsf3 = -inf\nsf4 = nan\nsf5 = +nan\nsf6 = -nan\nz = 0.0\ne = 0e0",
        "bool1 = true\nbool2 = false",
        "odt1 = 1979-05-27T07:32:00Z\nodt2 = 1979-05-27T00:32:00-07:00\nodt3 = 1979-05-27T00:32:00.999999-07:00\nodt4 = 1979-05-27 07:32:00Z\nodt5 = 1979-05-27t07:32:00z",
        "ldt1 = 1979-05-27T07:32:00\nldt2 = 1979-05-27T00:32:00.999999\nld1 = 1979-05-27\nlt1 = 07:32:00\nlt2 = 00:32:00.999999\nleap = 2024-02-29\nd = 1979-05-27 # a date, then a comment",
        "integers = [ 1, 2, 3 ]\ncolors = [ \"red\", \"yellow\", \"green\" ]\nnested_arrays_of_ints = [ [ 1, 2 ], [3, 4, 5] ]\nnested_mixed_array = [ [ 1, 2 ], [\"a\", \"b\", \"c\"] ]\nstring_array = [ \"all\", 'strings', \"\"\"are the same\"\"\", '''type''' ]\nnumbers = [ 0.1, 0.2, 0.5, 1, 2, 5 ]\ncontributors = [\n  \"Foo Bar <foo@example.com>\",\n  { name = \"Baz Qux\", email = \"bazqux@example.com\", url = \"https://example.com/bazqux\" }\n]",
        "integers2 = [\n  1, 2, 3\n]\nintegers3 = [\n  1,\n  2, # this is ok\n]\nempty = [ ]\nempty2 = [\n# nothing\n]",
        "[table-1]\nkey1 = \"some string\"\nkey2 = 123\n\n[table-2]\nkey1 = \"another string\"\nkey2 = 456\n[dog.\"tater.man\"]\ntype.name = \"pug\"\n[ j . \"ʞ\" . 'l' ]\n[a.b.c]\n[ d.e.f ]  # comment",
        "name = { first = \"Tom\", last = \"Preston-Werner\" }\npoint = { x = 1, y = 2 }\nanimal = { type.name = \"pug\" }\nempty = {}\nnested = { a = { b = [ 1,\n 2 ] } }",
        "[[products]]\nname = \"Hammer\"\nsku = 738594937\n\n[[products]]  # empty table within the array\n\n[[products]]\nname = \"Nail\"\n[[fruits]]\nname = \"apple\"\n[fruits.physical]\ncolor = \"red\"\n[[fruits.varieties]]\nname = \"red delicious\"\n[[ fruits.varieties ]]\nname = \"granny smith\"",
        "[server]\nworkers = 2 # comment ünïcode\n[[listener]]\nbind = \"127.0.0.1:1883\"",
        "a = [" + String(repeating: "[", count: 99) + String(repeating: "]", count: 100),
        // 100 deep with tables from a header and dotted keys, then arrays and inline tables.
        "[" + Array(repeating: "t", count: 98).joined(separator: ".") + "]\nx.y = [1]",
        "a = { b.c = { d = [ [1] ] } }",
        Array(repeating: "k", count: 101).joined(separator: ".") + " = 1",
        "u = \"\\u0001 and \\u00e9\"",
    ]

    @Test("valid TOML passes the check and TOMLKit reads it", arguments: valid)
    func validTOML(text: String) throws {
        #expect(TOMLSyntax.check(text) == nil, "\(String(describing: TOMLSyntax.check(text)))")
        _ = try TOMLTable(string: text)
    }

    /// Malformed text, with where the check stops.
    static let invalid: [(String, line: Int, column: Int)] = [
        // What made toml++ 3.4.0 fail assertions (Fuzz/regressions/config/).
        ("[#", 1, 2), ("[&", 1, 2), ("[[[a]]]", 1, 3), ("[\nname = 1", 1, 2), ("[ ", 1, 3),
        ("\u{FEFF}[\u{FFFD}mitsnkcp[ni5\n", 1, 2),
        ("o=[}", 1, 4), ("o=[,", 1, 4), ("o=[1,,2]", 1, 6), ("o = [1 2]", 1, 8),
        ("e=6979-05-27T:", 1, 14), ("e=6979-05-27T07:", 1, 17), ("e = 1979-05-27T07:32", 1, 21),
        // Lines, comments and keys.
        ("a = 1\rb = 2", 1, 7), ("# a \u{7} bell", 1, 5), ("a = 1 # \u{1}", 1, 9), ("= 1", 1, 1), ("a b = 1", 1, 3),
        ("a. = 1", 1, 4), ("a = 1 b = 2", 1, 7), ("[a]]", 1, 4), ("[[a]", 1, 5), ("[[a] ]", 1, 5), ("\"\"\"k\"\"\" = 1", 1, 3),
        ("ʞ = 1", 1, 1), ("a =", 1, 4), ("a = # no value", 1, 5), ("\n\nkey = value", 3, 7),
        // Strings.
        ("a = \"abc", 1, 9), ("a = \"ab\nc\"", 1, 8), ("a = \"\\x41\"", 1, 7), ("a = \"\\uD800\"", 1, 12), ("a = \"\\u12\"", 1, 10),
        ("a = \"\\U00110000\"", 1, 16), ("a = 'it''s'", 1, 9), ("a = \"\"\"abc\"\"\"\"\"\"", 1, 17), ("a = '''abc", 1, 11),
        ("a = \"tab\\ x\"", 1, 10), ("a = \"\u{8}\"", 1, 6), ("a = \"\"\"x\\ y\"\"\"", 1, 11),
        // Numbers.
        ("a = 01", 1, 7), ("a = 1__0", 1, 7), ("a = 1_", 1, 7), ("a = _1", 1, 5), ("a = 1x", 1, 6), ("a = +0x1", 1, 6),
        ("a = 0x", 1, 7), ("a = 0b102", 1, 9), ("a = 1.", 1, 7), ("a = .5", 1, 5), ("a = 1e", 1, 7), ("a = 1.5.3", 1, 8), ("a = infinity", 1, 8),
        ("a = True", 1, 5), ("a = truex", 1, 9),
        // Dates and times.
        ("a = 1979-13-01", 1, 15), ("a = 2023-02-29", 1, 15), ("a = 1979-05-27T25:00:00", 1, 24), ("a = 07:32", 1, 10),
        ("a = 1979-05-27T07:32:00+7:00", 1, 26), ("a = 1979-05-27T07:32:00.", 1, 25), ("a = 1979-5-27", 1, 11),
        // Arrays and inline tables.
        ("a = [1, 2", 1, 10), ("a = {x = 1,}", 1, 12), ("a = {x = 1\n}", 1, 11), ("a = {x = 1 y = 2}", 1, 12), ("a = {x}", 1, 7),
        ("a = " + String(repeating: "[", count: 101), 1, 105),
        // Tables nest too: a header, dotted keys and inline tables count with the arrays.
        ("[" + Array(repeating: "t", count: 101).joined(separator: ".") + "]", 1, 203),
        (Array(repeating: "k", count: 102).joined(separator: ".") + " = 1", 1, 204),
        ("[" + Array(repeating: "t", count: 98).joined(separator: ".") + "]\nx.y.z.w = 1", 2, 8),
        ("[" + Array(repeating: "t", count: 98).joined(separator: ".") + "]\nx = { y = [ [ 1 ] ] }", 2, 13),
        // Valid TOML, but TOMLKit would cut the string at the NUL.
        ("a = \"x\\u0000y\"", 1, 13), ("a = \"\\U00000000\"", 1, 16),
    ]

    @Test("malformed TOML is refused with its line and column, before toml++ reads it")
    func invalidTOML() throws {
        for (text, line, column) in Self.invalid {
            guard let failure = TOMLSyntax.check(text) else {
                Issue.record("accepted \(text.debugDescription)")
                continue
            }
            #expect(failure.line == line && failure.column == column, "\(text.debugDescription): \(failure)")
            #expect(throws: ConfigError.self) { try ConfigFile.parse(text, file: "bad.conf") }
        }
    }

    @Test("the config file's error names the file, the line and the problem")
    func configError() {
        do {
            _ = try ConfigFile.parse("[server]\nworkers = 2\n[#", file: "/etc/mqlite.conf")
            Issue.record("accepted [#")
        } catch {
            #expect(error.file == "/etc/mqlite.conf" && error.key == nil)
            #expect(error.problem == "TOML syntax error at line 3, column 2: expected a key, found '#'", "\(error.problem)")
        }
    }

    @Test("nesting is bounded without recursion: a million brackets are one error")
    func deepNesting() {
        let failure = TOMLSyntax.check("a = " + String(repeating: "[", count: 1_000_000))
        #expect(failure?.problem.contains("nested deeper than 100") == true)
    }
}

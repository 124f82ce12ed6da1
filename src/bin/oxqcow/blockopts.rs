//! How QEMU tools name block devices beyond a plain file name: QemuOpts
//! strings (`--image-opts`, `-o`, qemu-io's `open -o`) and `json:{...}`
//! file names, both flattened into dotted option keys ("file.filename").
//! Shared by `oxqcow io` and the qemu-img commands, which then open the
//! graph the options describe with `io_open::open`.

/// Whether a name carries a protocol prefix ("nbd:…", "blkdebug::…").
pub fn protocol_of(name: &str) -> Option<&str> {
    let colon = name.find(':')?;
    let slash = name.find('/').unwrap_or(usize::MAX);
    if colon < slash && colon > 0 {
        let p = &name[..colon];
        if p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Some(p);
        }
    }
    None
}

/// Whether a file name is really a block-layer specification (a
/// `json:{...}` name, or a protocol prefix such as "blkdebug::FILE" or
/// "nbd:..."), which `io_open::open` resolves, rather than a host file.
pub fn is_spec_name(name: &str) -> bool {
    name.starts_with("json:") || protocol_of(name).is_some()
}

/// Splits a QemuOpts string: `k=v,k2=v2`, ",," for a literal comma, a
/// bare key meaning "on". Returns the pairs in order.
pub fn parse_qemu_opts(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        // key: up to '=' or ','
        let mut key = String::new();
        while i < b.len() && b[i] != '=' && b[i] != ',' {
            key.push(b[i]);
            i += 1;
        }
        let value = if i < b.len() && b[i] == '=' {
            i += 1;
            let mut v = String::new();
            while i < b.len() {
                if b[i] == ',' {
                    if i + 1 < b.len() && b[i + 1] == ',' {
                        v.push(',');
                        i += 2;
                        continue;
                    }
                    break;
                }
                v.push(b[i]);
                i += 1;
            }
            v
        } else {
            "on".to_string()
        };
        if i < b.len() && b[i] == ',' {
            i += 1;
        }
        if key.is_empty() {
            if value == "on" {
                continue;
            }
            return Err("Invalid parameter ''".to_string());
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Flattens a `json:{...}` file name into dotted option keys. QEMU's
/// parser also takes single-quoted strings. `null` becomes "" (only
/// `backing: null` uses it).
pub fn parse_json_filename(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut p = JsonP {
        b: s.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    p.ws();
    if p.peek() != Some(b'{') {
        return Err("Could not parse the JSON options".into());
    }
    p.object("", &mut out)
        .map_err(|_| "Could not parse the JSON options".to_string())?;
    p.ws();
    if p.i != p.b.len() {
        return Err("Could not parse the JSON options".into());
    }
    Ok(out)
}

struct JsonP<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonP<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> Result<(), ()> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(())
        }
    }
    fn string(&mut self) -> Result<String, ()> {
        self.ws();
        let q = self.peek().ok_or(())?;
        if q != b'"' && q != b'\'' {
            return Err(());
        }
        self.i += 1;
        let mut v = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == q {
                return String::from_utf8(v).map_err(|_| ());
            }
            if c == b'\\' {
                let e = self.peek().ok_or(())?;
                self.i += 1;
                match e {
                    b'n' => v.push(b'\n'),
                    b't' => v.push(b'\t'),
                    b'r' => v.push(b'\r'),
                    b'b' => v.push(8),
                    b'f' => v.push(12),
                    b'u' => {
                        let h = std::str::from_utf8(self.b.get(self.i..self.i + 4).ok_or(())?)
                            .map_err(|_| ())?;
                        let cp = u32::from_str_radix(h, 16).map_err(|_| ())?;
                        self.i += 4;
                        let ch = char::from_u32(cp).ok_or(())?;
                        let mut tmp = [0u8; 4];
                        v.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                    }
                    other => v.push(other),
                }
            } else {
                v.push(c);
            }
        }
        Err(())
    }
    fn object(&mut self, prefix: &str, out: &mut Vec<(String, String)>) -> Result<(), ()> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            let k = self.string()?;
            self.expect(b':')?;
            let key = format!("{prefix}{k}");
            self.value(&key, out)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(()),
            }
        }
    }
    fn value(&mut self, key: &str, out: &mut Vec<(String, String)>) -> Result<(), ()> {
        self.ws();
        match self.peek().ok_or(())? {
            b'{' => self.object(&format!("{key}."), out),
            b'[' => {
                self.i += 1;
                let mut n = 0;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.value(&format!("{key}.{n}"), out)?;
                    n += 1;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(()),
                    }
                }
            }
            b'"' | b'\'' => {
                let s = self.string()?;
                out.push((key.to_string(), s));
                Ok(())
            }
            _ => {
                let st = self.i;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == b'-' || c == b'+' || c == b'.' {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                let tok = std::str::from_utf8(&self.b[st..self.i]).map_err(|_| ())?;
                let v = match tok {
                    "true" => "on".to_string(),
                    "false" => "off".to_string(),
                    "null" => String::new(),
                    "" => return Err(()),
                    t => t.to_string(),
                };
                out.push((key.to_string(), v));
                Ok(())
            }
        }
    }
}

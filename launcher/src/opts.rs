//! QEMU's command-line grammar, independent of what any option means.
//!
//! * argv: every option starts with `-` (`--opt` is the same as `-opt`, as in QEMU's `lookup_opt`); an option
//!   the table says takes an argument consumes the next argv element whatever it looks like (`-append -x`).
//! * option values in QemuOpts syntax (`qemu-option.c`, `opts_do_parse`): `key=val,key=val`; the first element
//!   may omit `key=` when the option has an implied first key (`-m 512M` is `-m size=512M`, `-drive file.img`
//!   is `-drive file=file.img`); `,,` is a literal comma inside a value; a bare `flag` is the deprecated short
//!   form of `flag=on` (`noflag` of `flag=off`); a repeated key keeps its last value.
//! * typed values: sizes (`qemu_strtosz`: a decimal or `0x` number, an optional fraction, an optional suffix
//!   `B k K M G T P E` in powers of 1024), booleans (`on/off/yes/no/true/false/y/n`), numbers.

use crate::error::{Error, Result};
use crate::options::{OptionDef, OPTIONS};

/// One option as it appeared in argv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgOpt {
    pub def: &'static OptionDef,
    /// As the user wrote it (`-m`, `--m`): QEMU's messages quote it that way.
    pub spelled: String,
    pub value: Option<String>,
}

impl ArgOpt {
    /// QEMU's error location for this option: the option and its argument, as written.
    pub fn location(&self) -> String {
        match &self.value {
            Some(v) => format!("{} {}", self.spelled, v),
            None => self.spelled.clone(),
        }
    }

    /// The argument (options without one never ask).
    pub fn arg(&self) -> &str {
        self.value.as_deref().unwrap_or("")
    }
}

/// Split argv (without argv[0]) into options, looking each one up in the option table.
pub fn split_argv(args: &[String]) -> Result<Vec<ArgOpt>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let spelled = &args[i];
        i += 1;
        let Some(name) = spelled.strip_prefix('-') else {
            // QEMU takes a bare argument as the first hard disk image (`-hda`).
            return Err(Error::NotSupportedYet(format!("a disk image given without an option ('{spelled}')"))
                .at(spelled.clone()));
        };
        let name = name.strip_prefix('-').unwrap_or(name);
        let Some(def) = OPTIONS.iter().find(|d| d.names.contains(&name)) else {
            return Err(Error::InvalidOption.at(spelled.clone()));
        };
        let value = if def.takes_arg {
            let Some(v) = args.get(i) else {
                return Err(Error::RequiresArgument.at(spelled.clone()));
            };
            i += 1;
            Some(v.clone())
        } else {
            None
        };
        out.push(ArgOpt { def, spelled: spelled.clone(), value });
    }
    Ok(out)
}

/// `help` or `?`: QEMU's `is_help_option`.
pub fn is_help(s: &str) -> bool {
    s == "help" || s == "?"
}

/// A parsed QemuOpts value: `key=value` pairs in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyVals {
    pub pairs: Vec<(String, String)>,
    /// Deprecation warnings QEMU prints while parsing (short-form booleans), one message each.
    pub warnings: Vec<String>,
}

impl KeyVals {
    /// Parse `text`; `implied` names the key of a first element written without `key=`.
    pub fn parse(text: &str, implied: Option<&str>) -> KeyVals {
        let mut kv = KeyVals::default();
        let mut rest = text;
        let mut first = true;
        while !rest.is_empty() {
            // The key ends at the first '=' or ','; commas in keys cannot be escaped (QEMU's get_opt_name).
            let key_len = rest.find(['=', ',']).unwrap_or(rest.len());
            let has_value = rest[key_len..].starts_with('=');
            if !has_value && first && implied.is_some() {
                let (value, after) = take_value(rest);
                kv.pairs.push((implied.unwrap_or_default().to_string(), value));
                rest = after;
            } else if !has_value {
                // Short-form boolean: "flag" means flag=on, "noflag" flag=off.
                let word = &rest[..key_len];
                let (key, value) = match word.strip_prefix("no") {
                    Some(k) => (k, "off"),
                    None => (word, "on"),
                };
                kv.warnings.push(format!(
                    "warning: short-form boolean option '{word}' deprecated\nPlease use {key}={value} instead"
                ));
                kv.pairs.push((key.to_string(), value.to_string()));
                rest = rest[key_len..].strip_prefix(',').unwrap_or(&rest[key_len..]);
            } else {
                let key = rest[..key_len].to_string();
                let (value, after) = take_value(&rest[key_len + 1..]);
                kv.pairs.push((key, value));
                rest = after;
            }
            first = false;
        }
        kv
    }

    /// The value of `key` (the last one when repeated, as QEMU's `qemu_opt_get`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// QemuOpts lists with a fixed set of keys refuse others as soon as they are parsed.
    pub fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self.pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(Error::InvalidParameter(k.clone())),
            None => Ok(()),
        }
    }

    /// Keys not in `known`, in order of appearance (for property-style lists, checked later).
    pub fn unknown_keys<'a>(&'a self, known: &'a [&str]) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs.iter().map(|(k, _)| k.as_str()).filter(move |k| !known.contains(k))
    }

    /// A QEMU_OPT_SIZE value in bytes.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| parse_size_opt(key, v, 1)).transpose()
    }

    /// A QEMU_OPT_BOOL value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| parse_bool(v).ok_or_else(|| Error::ExpectsBool(key.to_string()))).transpose()
    }

    /// A QEMU_OPT_NUMBER value.
    pub fn get_number(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| parse_u64(v).ok_or_else(|| Error::ExpectsNumber(key.to_string()))).transpose()
    }
}

/// Read a value up to the next single comma; `,,` stands for one comma. Returns the value and the text after
/// the separating comma.
fn take_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if let Some(&(_, ',')) = chars.peek() {
                chars.next();
                value.push(',');
                continue;
            }
            return (value, &s[i + 1..]);
        }
        value.push(c);
    }
    (value, "")
}

/// QEMU's `qapi_bool_parse`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// An unsigned integer in C's `strtoull(.., 0)` forms: decimal, `0x` hex, leading-`0` octal.
pub fn parse_u64(v: &str) -> Option<u64> {
    let v = v.trim_start();
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SizeError {
    Invalid,
    OutOfRange,
}

/// QEMU's `qemu_strtosz`: `default_unit` applies when no suffix is given (1 for bytes; `-m` uses MiB).
pub fn parse_size(v: &str, default_unit: u64) -> std::result::Result<u64, SizeError> {
    let s = v.trim_start();
    if s.starts_with('-') {
        return Err(SizeError::Invalid);
    }
    let (hex, digits_start) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(_) => (true, 2),
        None => (false, 0),
    };
    let body = &s[digits_start..];
    let int_len = body.find(|c: char| if hex { !c.is_ascii_hexdigit() } else { !c.is_ascii_digit() });
    let int_len = int_len.unwrap_or(body.len());
    if int_len == 0 {
        return Err(SizeError::Invalid);
    }
    let int_part = &body[..int_len];
    let mut rest = &body[int_len..];
    let mut frac_digits = "";
    if !hex && rest.starts_with('.') {
        let f = &rest[1..];
        let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        frac_digits = &f[..n];
        rest = &f[n..];
    }
    let unit = match rest {
        "" => default_unit,
        _ if rest.len() == 1 => match rest.as_bytes()[0].to_ascii_lowercase() {
            b'b' => 1,
            b'k' => 1 << 10,
            b'm' => 1 << 20,
            b'g' => 1 << 30,
            b't' => 1 << 40,
            b'p' => 1 << 50,
            b'e' => 1 << 60,
            _ => return Err(SizeError::Invalid),
        },
        _ => return Err(SizeError::Invalid),
    };
    let int = if hex { u64::from_str_radix(int_part, 16) } else { int_part.parse::<u64>() };
    let int = int.map_err(|_| SizeError::OutOfRange)?;
    let whole = int.checked_mul(unit).ok_or(SizeError::OutOfRange)?;
    if frac_digits.is_empty() {
        return Ok(whole);
    }
    // A fraction of a byte is meaningless: QEMU refuses "1.5" bytes but takes "1.5k".
    if unit == 1 {
        return Err(SizeError::Invalid);
    }
    let frac: f64 = format!("0.{frac_digits}").parse().map_err(|_| SizeError::Invalid)?;
    let extra = (frac * unit as f64) as u64;
    whole.checked_add(extra).ok_or(SizeError::OutOfRange)
}

/// A size option value, with QEMU's errors for option `key`.
pub fn parse_size_opt(key: &str, v: &str, default_unit: u64) -> Result<u64> {
    parse_size(v, default_unit).map_err(|e| match e {
        SizeError::Invalid => Error::ExpectsSize(key.to_string()),
        SizeError::OutOfRange => Error::SizeOutOfRange { key: key.to_string(), value: v.to_string() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(kv: &KeyVals) -> Vec<(&str, &str)> {
        kv.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn implied_first_key_and_escaped_commas() {
        let kv = KeyVals::parse("disk,,1.img,format=raw", Some("file"));
        assert_eq!(pairs(&kv), [("file", "disk,1.img"), ("format", "raw")]);
        let kv = KeyVals::parse("file=a,,b,,,if=none", None);
        assert_eq!(pairs(&kv), [("file", "a,b,"), ("if", "none")]);
        // The implied key applies to the first element only.
        let kv = KeyVals::parse("size=1G,slots=2", Some("size"));
        assert_eq!(pairs(&kv), [("size", "1G"), ("slots", "2")]);
        assert_eq!(KeyVals::parse("", Some("size")).pairs, []);
    }

    #[test]
    fn short_form_booleans_warn() {
        let kv = KeyVals::parse("1G,share,nomerge", Some("size"));
        assert_eq!(pairs(&kv), [("size", "1G"), ("share", "on"), ("merge", "off")]);
        assert_eq!(kv.warnings.len(), 2);
        assert!(kv.warnings[0].starts_with("warning: short-form boolean option 'share' deprecated"));
    }

    #[test]
    fn last_duplicate_wins() {
        let kv = KeyVals::parse("size=1G,size=2G", Some("size"));
        assert_eq!(kv.get("size"), Some("2G"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512", 1 << 20), Ok(512 << 20));
        assert_eq!(parse_size("512M", 1 << 20), Ok(512 << 20));
        assert_eq!(parse_size("1k", 1), Ok(1024));
        assert_eq!(parse_size("1K", 1), Ok(1024));
        assert_eq!(parse_size("2G", 1), Ok(2 << 30));
        assert_eq!(parse_size("1T", 1), Ok(1 << 40));
        assert_eq!(parse_size("100b", 1 << 20), Ok(100));
        assert_eq!(parse_size("1.5G", 1), Ok(3 << 29));
        assert_eq!(parse_size("0x1000", 1), Ok(4096));
        assert_eq!(parse_size("1.5", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("foo", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("-5", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("12X", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("99999999999999999999", 1), Err(SizeError::OutOfRange));
        assert_eq!(parse_size("20E", 1), Err(SizeError::OutOfRange));
    }

    #[test]
    fn booleans() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(t), Some(true));
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(f), Some(false));
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(
            KeyVals::parse("share=maybe", None).get_bool("share").unwrap_err().to_string(),
            "Parameter 'share' expects 'on' or 'off'"
        );
    }

    #[test]
    fn argv_forms() {
        let args: Vec<String> = ["--m", "1G", "-nographic", "-append", "-x"].iter().map(|s| s.to_string()).collect();
        let v = split_argv(&args).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].location(), "--m 1G");
        assert_eq!(v[2].value.as_deref(), Some("-x"));
        let e = split_argv(&["-m".to_string()]).unwrap_err();
        assert_eq!(e.to_string(), "-m: requires an argument");
        let e = split_argv(&["--bogus".to_string()]).unwrap_err();
        assert_eq!(e.to_string(), "--bogus: invalid option");
    }
}

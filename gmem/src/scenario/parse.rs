//! The `.gmem` parser. Every error names the file, line and column, what was
//! expected there and a hint; no input makes it panic.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use super::ast::{
    hypercall_return_from_name, FdRef, FileOp, Line, Op, Outcome, Region, RequireKind, Requirement,
    Scenario, Userspace,
};
use crate::error::errno_from_name;
use crate::mempolicy::{MbindFlags, MemPolicy, NodeMask};
use crate::uapi::{
    cap_from_name, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM,
};
use crate::Release;

/// A syntax error: `file:line:column: expected ..., found ...` and a hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParseError {
    /// The file, as given.
    pub file: String,
    /// Line (1-based).
    pub line: usize,
    /// Column (1-based, in characters).
    pub column: usize,
    /// What the parser expected there.
    pub expected: String,
    /// What it found: the token as written (no white space in it), or a
    /// description, which has spaces (`end of line`, `an empty file`).
    pub found: String,
    /// How to fix it.
    pub hint: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: expected {}, found {}\n  hint: {}",
            self.file,
            self.line,
            self.column,
            self.expected,
            self.found_shown(),
            self.hint
        )
    }
}

impl ParseError {
    /// `found` for a message: a token in backticks, a description as is.
    pub fn found_shown(&self) -> String {
        if self.found.is_empty() || self.found.contains(char::is_whitespace) {
            self.found.clone()
        } else {
            format!("`{}`", self.found)
        }
    }
}

impl std::error::Error for ParseError {}

/// Every syntax error of one file (at least one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParseErrors(pub Vec<ParseError>);

impl fmt::Display for ParseErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseErrors {}

const OPS: &str = "create_vm, create_guest_memfd, host_memory, mmap, set_memory_region, \
delete_memory_region, set_memory_attributes, fallocate, host_write, host_read, guest_write, \
guest_read, guest_map_gpa_range, pre_fault, set_memory_attributes2, pin, mbind, get_mempolicy, madvise, file_read, file_write, file_pread, file_pwrite, file_lseek, \
file_ftruncate, file_ioctl, stat, same_inode, check_extension, close, require";
const NUMBER_HINT: &str =
    "numbers are decimal or 0x hex (0o octal), optionally negative, with an optional K, M, G or T suffix: 16K, 0x1000, 0x1_0000_0000";
const RESERVED: &[&str] = &[
    "kvm", "closed", "memfd", "private", "shared", "ok", "require",
];

/// The largest scenario file the runner reads.
pub const MAX_SCENARIO_BYTES: usize = 16 << 20;
/// The most operation lines a scenario may have.
pub const MAX_OPERATIONS: usize = 100_000;
/// The most bytes one `host_write` may write.
pub const MAX_HOST_WRITE: u64 = 1 << 30;
/// Tokens longer than this are shortened in messages.
const MAX_TOKEN_SHOWN: usize = 40;

/// `s` if it has at most `max` characters, else its start and end around
/// `…`, with `max` characters in all.
pub fn shorten(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max || max < 5 {
        return s.to_string();
    }
    let tail = (max - 1) / 3;
    let head = max - 1 - tail;
    let start: String = s.chars().take(head).collect();
    let end: String = s.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

/// Parses the text of a scenario file; `path` is used in messages.
pub fn parse(path: &str, text: &str) -> Result<Scenario, ParseErrors> {
    let mut p = Parser {
        file: path,
        bound: HashMap::new(),
        errors: Vec::new(),
    };
    let whole = |expected: &str, found: String, hint: &str| {
        ParseErrors(vec![ParseError {
            file: path.to_string(),
            line: 1,
            column: 1,
            expected: expected.to_string(),
            found,
            hint: hint.to_string(),
        }])
    };
    if text.len() > MAX_SCENARIO_BYTES {
        return Err(whole(
            &format!("a scenario of at most {} MiB", MAX_SCENARIO_BYTES >> 20),
            format!("{} bytes", text.len()),
            "split the scenario into several files",
        ));
    }
    // A UTF-8 byte order mark is not part of the first line.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut requires = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let content = match raw.find('#') {
            Some(at) => &raw[..at],
            None => raw,
        };
        if content.trim().is_empty() {
            continue;
        }
        let mut cx = LineCx {
            file: path,
            line: line_no,
            raw: content,
        };
        match p.line(&mut cx, &mut requires) {
            Ok(Some(l)) => {
                if lines.len() == MAX_OPERATIONS {
                    p.errors.push(*cx.err(
                        0,
                        &format!("at most {MAX_OPERATIONS} operations"),
                        "",
                        "split the scenario into several files",
                    ));
                    break;
                }
                lines.push(l)
            }
            Ok(None) => {}
            Err(e) => {
                // Keep the name a failed line binds, so that later lines
                // using it do not each report it as unbound.
                let toks = words(content, 0);
                if toks.len() >= 2 && toks[1].text == "=" && is_ident(toks[0].text) {
                    p.bound.entry(toks[0].text.to_string()).or_insert(line_no);
                }
                p.errors.push(*e)
            }
        }
    }
    if p.errors.is_empty() && lines.is_empty() {
        return Err(whole(
            "at least one operation",
            if text.trim().is_empty() {
                "an empty file".to_string()
            } else {
                "only comments and require lines".to_string()
            },
            "a scenario is operation lines such as `vm = create_vm` (docs/scenarios.md)",
        ));
    }
    if p.errors.is_empty() {
        Ok(Scenario {
            path: path.to_string(),
            requires,
            lines,
        })
    } else {
        Err(ParseErrors(p.errors))
    }
}

type PResult<T> = Result<T, Box<ParseError>>;

struct Parser<'a> {
    #[allow(dead_code)]
    file: &'a str,
    /// Handle names and the line that binds each.
    bound: HashMap<String, usize>,
    errors: Vec<ParseError>,
}

struct LineCx<'a> {
    file: &'a str,
    line: usize,
    raw: &'a str,
}

/// A word of a line and where it starts.
#[derive(Debug, Clone, Copy)]
struct Tok<'a> {
    text: &'a str,
    /// Byte offset in the line.
    at: usize,
}

impl LineCx<'_> {
    fn col(&self, at: usize) -> usize {
        self.raw
            .get(..at)
            .map_or(at, |s| s.chars().count())
            .saturating_add(1)
    }

    fn err(&self, at: usize, expected: &str, found: &str, hint: &str) -> Box<ParseError> {
        Box::new(ParseError {
            file: self.file.to_string(),
            line: self.line,
            column: self.col(at),
            expected: expected.to_string(),
            found: if found.is_empty() {
                "end of line".to_string()
            } else {
                shorten(found, MAX_TOKEN_SHOWN)
            },
            hint: hint.to_string(),
        })
    }

    fn end(&self) -> usize {
        self.raw.trim_end().len()
    }
}

fn words(s: &str, base: usize) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            if let Some(st) = start.take() {
                out.push(Tok {
                    text: &s[st..i],
                    at: base + st,
                });
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(st) = start {
        out.push(Tok {
            text: &s[st..],
            at: base + st,
        });
    }
    out
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses a number: decimal, `0x` hex or `0o` octal, `_` separators, an
/// optional leading `-` (two's complement) and a K/M/G/T suffix.
pub fn parse_number(s: &str) -> Option<u64> {
    number_value(s).ok()
}

/// Why a word is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberError {
    /// Not written as a number.
    Malformed,
    /// Written as one, but more than 64 bits hold.
    TooBig,
}

fn number_value(s: &str) -> Result<u64, NumberError> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if let Some(o) = s.strip_prefix("0o") {
        (8, o)
    } else {
        (10, s)
    };
    let (digits, shift) = match digits.chars().last() {
        // A hex number's last digit may be a letter; only K/M/G/T are suffixes.
        Some('K') => (&digits[..digits.len() - 1], 10),
        Some('M') => (&digits[..digits.len() - 1], 20),
        Some('G') => (&digits[..digits.len() - 1], 30),
        Some('T') => (&digits[..digits.len() - 1], 40),
        _ => (digits, 0),
    };
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if clean.is_empty() || digits.starts_with('_') || !clean.chars().all(|c| c.is_digit(radix)) {
        return Err(NumberError::Malformed);
    }
    let v = u64::from_str_radix(&clean, radix).map_err(|_| NumberError::TooBig)?;
    let v = v.checked_mul(1u64 << shift).ok_or(NumberError::TooBig)?;
    Ok(if neg { v.wrapping_neg() } else { v })
}

/// The arguments after the operation name: positional words and `key=value`.
struct Args<'a> {
    positional: Vec<Tok<'a>>,
    keyed: Vec<(Tok<'a>, Tok<'a>)>,
    used_pos: usize,
    used_keys: HashSet<usize>,
}

impl<'a> Args<'a> {
    fn new(cx: &LineCx, toks: &[Tok<'a>], op: &str) -> PResult<Self> {
        let mut positional = Vec::new();
        let mut keyed: Vec<(Tok, Tok)> = Vec::new();
        for t in toks {
            if let Some(eq) = t.text.find('=') {
                let key = Tok {
                    text: &t.text[..eq],
                    at: t.at,
                };
                let val = Tok {
                    text: &t.text[eq + 1..],
                    at: t.at + eq + 1,
                };
                if !is_ident(key.text) {
                    return Err(cx.err(
                        t.at,
                        "an argument `key=value`",
                        t.text,
                        "arguments are written key=value with no spaces around `=`",
                    ));
                }
                if val.text.is_empty() {
                    return Err(cx.err(
                        val.at,
                        &format!("a value for `{}`", key.text),
                        "",
                        "write key=value with no space after `=`",
                    ));
                }
                if keyed.iter().any(|(k, _)| k.text == key.text) {
                    return Err(cx.err(
                        t.at,
                        "each argument once",
                        t.text,
                        &format!("`{}` is given twice to {op}", key.text),
                    ));
                }
                keyed.push((key, val));
            } else {
                positional.push(*t);
            }
        }
        Ok(Args {
            positional,
            keyed,
            used_pos: 0,
            used_keys: HashSet::new(),
        })
    }

    fn key(&mut self, k: &str) -> Option<Tok<'a>> {
        let i = self.keyed.iter().position(|(key, _)| key.text == k)?;
        self.used_keys.insert(i);
        Some(self.keyed[i].1)
    }

    fn pos(&mut self) -> Option<Tok<'a>> {
        let t = self.positional.get(self.used_pos).copied();
        if t.is_some() {
            self.used_pos += 1;
        }
        t
    }

    fn finish(&self, cx: &LineCx, op: &str, usage: &str) -> PResult<()> {
        if let Some(t) = self.positional.get(self.used_pos) {
            return Err(cx.err(
                t.at,
                &format!("no more words for {op}"),
                t.text,
                &format!("usage: {usage}"),
            ));
        }
        for (i, (k, _)) in self.keyed.iter().enumerate() {
            if !self.used_keys.contains(&i) {
                return Err(cx.err(
                    k.at,
                    &format!("an argument of {op}"),
                    k.text,
                    &format!("usage: {usage}"),
                ));
            }
        }
        Ok(())
    }
}

fn number(cx: &LineCx, t: Tok, what: &str) -> PResult<u64> {
    number_value(t.text).map_err(|e| match e {
        NumberError::Malformed => {
            cx.err(t.at, &format!("a number for {what}"), t.text, NUMBER_HINT)
        }
        NumberError::TooBig => cx.err(
            t.at,
            &format!("a number for {what} that fits in 64 bits"),
            t.text,
            "numbers are 64-bit: at most 0xffff_ffff_ffff_ffff (18446744073709551615)",
        ),
    })
}

/// A value made of `|`-joined names from `names` and numbers.
fn flags(cx: &LineCx, t: Tok, what: &str, names: &[(&str, u64)]) -> PResult<u64> {
    let mut v = 0u64;
    let mut at = t.at;
    for part in t.text.split('|') {
        if let Some((_, n)) = names.iter().find(|(name, _)| *name == part) {
            v |= n;
        } else if let Some(n) = parse_number(part) {
            v |= n;
        } else {
            let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
            return Err(cx.err(
                at,
                &format!("a flag of {what}"),
                part,
                &format!(
                    "write {} or a number, joined with `|`",
                    if known.is_empty() {
                        "a number".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        at += part.len() + 1;
    }
    Ok(v)
}

fn need<'a>(cx: &LineCx, a: &mut Args<'a>, key: &str, op: &str, usage: &str) -> PResult<Tok<'a>> {
    a.key(key).ok_or_else(|| {
        cx.err(
            cx.end(),
            &format!("`{key}=` for {op}"),
            "",
            &format!("usage: {usage}"),
        )
    })
}

impl Parser<'_> {
    fn handle(&self, cx: &LineCx, t: Option<Tok>, what: &str, usage: &str) -> PResult<String> {
        let Some(t) = t else {
            return Err(cx.err(cx.end(), what, "", &format!("usage: {usage}")));
        };
        if !is_ident(t.text) {
            return Err(cx.err(
                t.at,
                what,
                t.text,
                "handles are names bound earlier with `NAME = ...`",
            ));
        }
        if !self.bound.contains_key(t.text) {
            return Err(cx.err(
                t.at,
                what,
                t.text,
                &format!(
                    "`{}` is not bound by an earlier line; bind it with `{} = ...`",
                    t.text, t.text
                ),
            ));
        }
        Ok(t.text.to_string())
    }

    fn line(&mut self, cx: &mut LineCx, requires: &mut Vec<Requirement>) -> PResult<Option<Line>> {
        let raw = cx.raw;
        let (op_part, outcome_part) = match raw.find("=>") {
            Some(at) => (&raw[..at], Some((&raw[at + 2..], at + 2))),
            None => (raw, None),
        };
        let toks = words(op_part, 0);
        let Some(first) = toks.first() else {
            return Err(cx.err(
                0,
                "an operation before `=>`",
                "=>",
                "a line is `[NAME =] OP ARGS... [=> OUTCOME]`",
            ));
        };
        if first.text == "require" {
            if let Some((_, at)) = outcome_part {
                return Err(cx.err(
                    at - 2,
                    "a capability",
                    "=>",
                    "require lines have no outcome",
                ));
            }
            if toks.len() < 2 {
                return Err(cx.err(cx.end(), "a capability after `require`", "", REQUIRE_HINT));
            }
            for t in &toks[1..] {
                requires.push(Requirement {
                    line: cx.line,
                    kind: require(cx, *t)?,
                });
            }
            return Ok(None);
        }
        let (bind, rest) = if toks.len() >= 2 && toks[1].text == "=" {
            let name = toks[0];
            if !is_ident(name.text) {
                return Err(cx.err(
                    name.at,
                    "a handle name",
                    name.text,
                    "names are letters, digits and `_`, starting with a letter",
                ));
            }
            if RESERVED.contains(&name.text) || OPS.split(", ").any(|o| o == name.text) {
                return Err(cx.err(
                    name.at,
                    "a handle name",
                    name.text,
                    &format!("`{}` is a reserved word; pick another name", name.text),
                ));
            }
            if let Some(first) = self.bound.get(name.text) {
                return Err(cx.err(
                    name.at,
                    "a handle name not bound before",
                    name.text,
                    &format!(
                        "`{}` is already bound on line {first}; a name is bound once, pick another",
                        name.text
                    ),
                ));
            }
            (Some(name), &toks[2..])
        } else if first.text.contains('=') && first.text.find('=') == Some(first.text.len() - 1) {
            return Err(cx.err(
                first.at,
                "`NAME = OP`",
                first.text,
                "put spaces around `=` when binding: `g = create_guest_memfd vm size=4K`",
            ));
        } else {
            (None, &toks[..])
        };
        let Some(op_tok) = rest.first() else {
            return Err(cx.err(cx.end(), "an operation", "", &format!("operations: {OPS}")));
        };
        let op = self.op(cx, *op_tok, &rest[1..])?;
        let binds = matches!(
            op,
            Op::CreateVm { .. }
                | Op::CreateGuestMemfd { .. }
                | Op::HostMemory { .. }
                | Op::Mmap { .. }
                | Op::Pin { .. }
        );
        if let (Some(b), false) = (bind, binds) {
            return Err(cx.err(b.at, "an operation without `NAME =`", b.text, &format!("{} gives no handle; only create_vm, create_guest_memfd, host_memory, mmap and pin do", op_tok.text)));
        }
        let (expect, since) = match outcome_part {
            Some((text, at)) => release_outcomes(cx, text, at)?,
            None => (Outcome::Ok, Vec::new()),
        };
        // A hypercall's return value is named as kvm_para.h names it.
        let hc = |o: Outcome| match (o, &op) {
            (Outcome::Value { value, .. }, Op::GuestMapGpaRange { .. }) => {
                Outcome::HypercallReturn { value }
            }
            (o, _) => o,
        };
        let expect = hc(expect);
        let since = since.into_iter().map(|(r, o)| (r, hc(o))).collect();
        if let Some(b) = bind {
            self.bound.insert(b.text.to_string(), cx.line);
        }
        Ok(Some(Line {
            line: cx.line,
            text: raw.trim().to_string(),
            bind: bind.map(|b| b.text.to_string()),
            op,
            expect,
            since,
        }))
    }

    fn op(&mut self, cx: &LineCx, op: Tok, toks: &[Tok]) -> PResult<Op> {
        let name = op.text;
        let mut a = Args::new(cx, toks, name)?;
        let usage: &str;
        let parsed = match name {
            "create_vm" => {
                usage = "NAME = create_vm [type=default|sw_protected|N]";
                let vm_type = match a.key("type") {
                    Some(t) => vm_type(cx, t)?,
                    None => KVM_X86_DEFAULT_VM as u64,
                };
                Op::CreateVm { vm_type }
            }
            "create_guest_memfd" => {
                usage = "NAME = create_guest_memfd VM size=N [flags=mmap|init_shared|N]";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let size = number(cx, need(cx, &mut a, "size", name, usage)?, "size")?;
                let flags = match a.key("flags") {
                    Some(t) => flags(cx, t, "flags", GMEM_FLAGS)?,
                    None => 0,
                };
                let reserved = match a.key("reserved") {
                    Some(t) => number(cx, t, "reserved")?,
                    None => 0,
                };
                Op::CreateGuestMemfd {
                    vm,
                    size,
                    flags,
                    reserved,
                }
            }
            "host_memory" => {
                usage = "NAME = host_memory size=N";
                let size = number(cx, need(cx, &mut a, "size", name, usage)?, "size")?;
                Op::HostMemory { size }
            }
            "mmap" => {
                usage = "NAME = mmap G [offset=N] [size=N] [private]";
                let gmem = self.handle(cx, a.pos(), "a guest_memfd handle", usage)?;
                let offset = opt_num(cx, &mut a, "offset")?.unwrap_or(0) as i64;
                let size = opt_num(cx, &mut a, "size")?;
                let private = match a.pos() {
                    Some(t) if t.text == "private" => true,
                    Some(t) if t.text == "shared" => false,
                    Some(t) => {
                        return Err(cx.err(
                            t.at,
                            "`private` or `shared`",
                            t.text,
                            &format!("usage: {usage}"),
                        ))
                    }
                    None => false,
                };
                Op::Mmap {
                    gmem,
                    offset,
                    size,
                    private,
                }
            }
            "set_memory_region" => {
                usage = "set_memory_region VM slot=N [as=N] gpa=N size=N [flags=guest_memfd|readonly|log_dirty|N] [userspace=H|M|0|N] [userspace_offset=N] [guest_memfd=G|closed|kvm|VM|memfd|N] [offset=N] [ioctl=v1|v2]";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let slot = u32_arg(cx, need(cx, &mut a, "slot", name, usage)?, "slot")?;
                let as_id = match a.key("as") {
                    Some(t) => u32_arg(cx, t, "as")?,
                    None => 0,
                };
                let gpa = number(cx, need(cx, &mut a, "gpa", name, usage)?, "gpa")?;
                let size = number(cx, need(cx, &mut a, "size", name, usage)?, "size")?;
                let region = self.region_rest(cx, &mut a, vm, slot, as_id, gpa, size)?;
                Op::SetMemoryRegion(region)
            }
            "delete_memory_region" => {
                usage = "delete_memory_region VM slot=N [as=N] [flags=...] [guest_memfd=...] [ioctl=v1|v2]";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let slot = u32_arg(cx, need(cx, &mut a, "slot", name, usage)?, "slot")?;
                let as_id = match a.key("as") {
                    Some(t) => u32_arg(cx, t, "as")?,
                    None => 0,
                };
                let gpa = opt_num(cx, &mut a, "gpa")?.unwrap_or(0);
                let region = self.region_rest(cx, &mut a, vm, slot, as_id, gpa, 0)?;
                Op::SetMemoryRegion(region)
            }
            "set_memory_attributes" => {
                usage =
                    "set_memory_attributes VM gpa=N size=N attributes=private|shared|N [flags=N]";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let gpa = number(cx, need(cx, &mut a, "gpa", name, usage)?, "gpa")?;
                let size = number(cx, need(cx, &mut a, "size", name, usage)?, "size")?;
                let attributes = flags(
                    cx,
                    need(cx, &mut a, "attributes", name, usage)?,
                    "attributes",
                    &[
                        ("private", KVM_MEMORY_ATTRIBUTE_PRIVATE as u64),
                        ("shared", 0),
                    ],
                )?;
                let flags = opt_num(cx, &mut a, "flags")?.unwrap_or(0);
                Op::SetMemoryAttributes {
                    vm,
                    gpa,
                    size,
                    attributes,
                    flags,
                }
            }
            "fallocate" => {
                usage = "fallocate G mode=allocate|punch_hole|N offset=N len=N";
                let gmem = self.handle(cx, a.pos(), "a guest_memfd handle", usage)?;
                let mode = flags(
                    cx,
                    need(cx, &mut a, "mode", name, usage)?,
                    "mode",
                    &[
                        ("allocate", FALLOC_FL_KEEP_SIZE as u64),
                        ("keep_size", FALLOC_FL_KEEP_SIZE as u64),
                        (
                            "punch_hole",
                            (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) as u64,
                        ),
                    ],
                )? as i32;
                let offset = number(cx, need(cx, &mut a, "offset", name, usage)?, "offset")? as i64;
                let len = number(cx, need(cx, &mut a, "len", name, usage)?, "len")? as i64;
                Op::Fallocate {
                    gmem,
                    mode,
                    offset,
                    len,
                }
            }
            "host_write" => {
                usage = "host_write M offset=N byte=N [len=N]";
                let mem = self.handle(cx, a.pos(), "a host memory or mapping handle", usage)?;
                let offset = number(cx, need(cx, &mut a, "offset", name, usage)?, "offset")?;
                let byte = byte_arg(cx, need(cx, &mut a, "byte", name, usage)?)?;
                let len = opt_num(cx, &mut a, "len")?.unwrap_or(1);
                if len > MAX_HOST_WRITE {
                    // The value as the user wrote it (`2G`), not in bytes.
                    let (at, written) = a
                        .keyed
                        .iter()
                        .find(|(k, _)| k.text == "len")
                        .map_or((cx.end(), ""), |(_, v)| (v.at, v.text));
                    return Err(cx.err(
                        at,
                        "a host_write len of at most 1G",
                        written,
                        "one host_write touches at most 1 GiB of memory; write a larger range \
                         with several lines (the memory budget counts every page they touch)",
                    ));
                }
                Op::HostWrite {
                    mem,
                    offset,
                    byte,
                    len,
                }
            }
            "host_read" => {
                usage = "host_read M offset=N";
                let mem = self.handle(cx, a.pos(), "a host memory or mapping handle", usage)?;
                let offset = number(cx, need(cx, &mut a, "offset", name, usage)?, "offset")?;
                Op::HostRead { mem, offset }
            }
            "guest_write" => {
                usage = "guest_write VM gpa=N byte=N";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let gpa = number(cx, need(cx, &mut a, "gpa", name, usage)?, "gpa")?;
                let byte = byte_arg(cx, need(cx, &mut a, "byte", name, usage)?)?;
                Op::GuestWrite { vm, gpa, byte }
            }
            "guest_read" => {
                usage = "guest_read VM gpa=N";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let gpa = number(cx, need(cx, &mut a, "gpa", name, usage)?, "gpa")?;
                Op::GuestRead { vm, gpa }
            }
            "pre_fault" => {
                usage = "pre_fault VM gpa=N size=N [flags=N]";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let gpa = number(cx, need(cx, &mut a, "gpa", name, usage)?, "gpa")?;
                let size = number(cx, need(cx, &mut a, "size", name, usage)?, "size")?;
                let flags = opt_num(cx, &mut a, "flags")?.unwrap_or(0);
                Op::PreFault {
                    vm,
                    gpa,
                    size,
                    flags,
                }
            }
            "set_memory_attributes2" => {
                usage =
                    "set_memory_attributes2 G offset=N size=N attributes=private|shared [flags=N]";
                let gmem = self.handle(cx, a.pos(), "a guest_memfd handle", usage)?;
                let offset = number(cx, need(cx, &mut a, "offset", name, usage)?, "offset")?;
                let size = number(cx, need(cx, &mut a, "size", name, usage)?, "size")?;
                let t = need(cx, &mut a, "attributes", name, usage)?;
                let attributes = flags(
                    cx,
                    t,
                    "attributes",
                    &[
                        ("private", KVM_MEMORY_ATTRIBUTE_PRIVATE as u64),
                        ("shared", 0),
                    ],
                )?;
                let flags = opt_num(cx, &mut a, "flags")?.unwrap_or(0);
                Op::SetMemoryAttributes2 {
                    gmem,
                    offset,
                    size,
                    attributes,
                    flags,
                }
            }
            "pin" => {
                usage = "P = pin M offset=N len=N";
                let mem = self.handle(cx, a.pos(), "host memory or a mapping", usage)?;
                let offset = number(cx, need(cx, &mut a, "offset", name, usage)?, "offset")?;
                let len = number(cx, need(cx, &mut a, "len", name, usage)?, "len")?;
                Op::Pin { mem, offset, len }
            }
            "mbind" => {
                usage = "mbind M [offset=N] [size=N] policy=MODE[|static|relative|balancing] [nodes=LIST] [flags=strict|move|move_all]";
                let mem = self.handle(cx, a.pos(), "host memory or a mapping", usage)?;
                let offset = opt_num(cx, &mut a, "offset")?.unwrap_or(0);
                let size = opt_num(cx, &mut a, "size")?;
                let t = need(cx, &mut a, "policy", name, usage)?;
                let (mode, mode_flags) = MemPolicy::parse_mode(t.text)
                    .map_err(|e| cx.err(t.at, "a policy mode", t.text, &e))?;
                let nodes = match a.key("nodes") {
                    Some(t) => node_list(cx, t)?,
                    None => NodeMask::NONE,
                };
                let flags = match a.key("flags") {
                    Some(t) => {
                        MbindFlags::from_bits_retain(flags(cx, t, "flags", MBIND_FLAGS)? as u32)
                    }
                    None => MbindFlags::empty(),
                };
                let policy = MemPolicy::new(mode, nodes).with_flags(mode_flags);
                Op::Mbind {
                    mem,
                    offset,
                    size,
                    policy,
                    flags,
                }
            }
            "get_mempolicy" => {
                usage = "get_mempolicy M [offset=N] => MODE[|FLAG]... [nodes=LIST]";
                let mem = self.handle(cx, a.pos(), "host memory or a mapping", usage)?;
                let offset = opt_num(cx, &mut a, "offset")?.unwrap_or(0);
                Op::GetMempolicy { mem, offset }
            }
            "madvise" => {
                usage = "madvise M [offset=N] [size=N] advice=collapse|remove|dontneed|populate_write|...";
                let mem = self.handle(cx, a.pos(), "host memory or a mapping", usage)?;
                let offset = opt_num(cx, &mut a, "offset")?.unwrap_or(0);
                let size = opt_num(cx, &mut a, "size")?;
                let t = need(cx, &mut a, "advice", name, usage)?;
                let advice = t
                    .text
                    .parse()
                    .map_err(|e: String| cx.err(t.at, "an advice", t.text, &e))?;
                Op::Madvise {
                    mem,
                    offset,
                    size,
                    advice,
                }
            }
            "guest_map_gpa_range" => {
                usage = "guest_map_gpa_range VM gpa=N pages=N private|shared";
                let vm = self.handle(cx, a.pos(), "a VM handle", usage)?;
                let gpa = number(cx, need(cx, &mut a, "gpa", name, usage)?, "gpa")?;
                let pages = number(cx, need(cx, &mut a, "pages", name, usage)?, "pages")?;
                let private = match a.pos() {
                    Some(t) if t.text == "private" => true,
                    Some(t) if t.text == "shared" => false,
                    t => {
                        return Err(cx.err(
                            t.map_or(cx.end(), |t| t.at),
                            "`private` or `shared`",
                            t.map_or("", |t| t.text),
                            &format!("usage: {usage}"),
                        ))
                    }
                };
                Op::GuestMapGpaRange {
                    vm,
                    gpa,
                    pages,
                    private,
                }
            }
            "file_read" | "file_write" | "file_pread" | "file_pwrite" | "file_lseek"
            | "file_ftruncate" | "file_ioctl" => {
                usage = "file_read G | file_write G | file_pread G | file_pwrite G | file_lseek G | file_ftruncate G size=N | file_ioctl G [request=N]";
                let gmem = self.handle(cx, a.pos(), "a guest_memfd handle", usage)?;
                let op = match name {
                    "file_read" => FileOp::Read,
                    "file_write" => FileOp::Write,
                    "file_pread" => FileOp::Pread,
                    "file_pwrite" => FileOp::Pwrite,
                    "file_lseek" => FileOp::Lseek,
                    "file_ftruncate" => FileOp::Ftruncate(number(
                        cx,
                        need(cx, &mut a, "size", name, usage)?,
                        "size",
                    )? as i64),
                    _ => FileOp::Ioctl(opt_num(cx, &mut a, "request")?.unwrap_or(0xAEFF)),
                };
                Op::File { gmem, op }
            }
            "stat" => {
                usage = "stat G";
                let gmem = self.handle(cx, a.pos(), "a guest_memfd handle", usage)?;
                Op::Stat { gmem }
            }
            "same_inode" => {
                usage = "same_inode G1 G2 => 0|1";
                let x = self.handle(cx, a.pos(), "a guest_memfd handle", usage)?;
                let y = self.handle(cx, a.pos(), "a second guest_memfd handle", usage)?;
                Op::SameInode { a: x, b: y }
            }
            "check_extension" => {
                usage = "check_extension [VM] CAP";
                let (vm, cap) = match (a.pos(), a.pos()) {
                    (Some(v), Some(c)) => {
                        (Some(self.handle(cx, Some(v), "a VM handle", usage)?), c)
                    }
                    (Some(c), None) => (None, c),
                    _ => {
                        return Err(cx.err(
                            cx.end(),
                            "a capability",
                            "",
                            &format!("usage: {usage}; capabilities: {}", cap_names()),
                        ))
                    }
                };
                let cap = match cap_from_name(cap.text) {
                    Some(c) => c,
                    None => match parse_number(cap.text).and_then(|n| u32::try_from(n).ok()) {
                        Some(n) => n,
                        None => {
                            return Err(cx.err(
                                cap.at,
                                "a capability name or number",
                                cap.text,
                                &format!("capabilities: {}", cap_names()),
                            ))
                        }
                    },
                };
                Op::CheckExtension { vm, cap }
            }
            "close" => {
                usage = "close X";
                let handle = self.handle(cx, a.pos(), "a handle to close", usage)?;
                Op::Close { handle }
            }
            _ => {
                return Err(cx.err(op.at, "an operation", name, &format!("operations: {OPS}")));
            }
        };
        a.finish(cx, name, usage)?;
        Ok(parsed)
    }

    #[allow(clippy::too_many_arguments)]
    fn region_rest(
        &self,
        cx: &LineCx,
        a: &mut Args,
        vm: String,
        slot: u32,
        as_id: u32,
        gpa: u64,
        size: u64,
    ) -> PResult<Region> {
        let usage = "set_memory_region VM slot=N [as=N] gpa=N size=N [flags=...] [userspace=H|M|0|N] [userspace_offset=N] [guest_memfd=G|closed|kvm|VM|memfd|N] [offset=N] [ioctl=v1|v2]";
        let flags = match a.key("flags") {
            Some(t) => {
                let f = flags(cx, t, "flags", SLOT_FLAGS)?;
                u32::try_from(f).map_err(|_| {
                    cx.err(
                        t.at,
                        "flags that fit 32 bits",
                        t.text,
                        "the flags field is a u32",
                    )
                })?
            }
            None => 0,
        };
        let userspace = match a.key("userspace") {
            Some(t) => match parse_number(t.text) {
                Some(n) => Userspace::Addr(n),
                None => Userspace::Handle(self.handle(
                    cx,
                    Some(t),
                    "host memory, a mapping or an address",
                    usage,
                )?),
            },
            None => Userspace::Addr(0),
        };
        let userspace_offset = opt_num(cx, a, "userspace_offset")?.unwrap_or(0);
        let guest_memfd = match a.key("guest_memfd") {
            Some(t) => match t.text {
                "closed" => FdRef::Closed,
                "kvm" => FdRef::Kvm,
                "memfd" => FdRef::Memfd,
                s => match parse_number(s) {
                    Some(n) => FdRef::Raw(n as u32),
                    None => FdRef::Handle(self.handle(
                        cx,
                        Some(t),
                        "a guest_memfd or VM handle, closed, kvm, memfd or a number",
                        usage,
                    )?),
                },
            },
            None => FdRef::Raw(0),
        };
        let offset = opt_num(cx, a, "offset")?.unwrap_or(0);
        let v1 = match a.key("ioctl") {
            Some(t) if t.text == "v1" => true,
            Some(t) if t.text == "v2" => false,
            Some(t) => {
                return Err(cx.err(
                    t.at,
                    "`v1` or `v2`",
                    t.text,
                    "ioctl=v1 uses the 32-byte KVM_SET_USER_MEMORY_REGION",
                ))
            }
            None => false,
        };
        Ok(Region {
            vm,
            slot,
            as_id,
            gpa,
            size,
            flags,
            userspace,
            userspace_offset,
            guest_memfd,
            offset,
            v1,
        })
    }
}

// The flag names a scenario writes; the fuzzer's printer writes the same.
pub(crate) const GMEM_FLAGS: &[(&str, u64)] = &[
    ("mmap", GUEST_MEMFD_FLAG_MMAP),
    ("init_shared", GUEST_MEMFD_FLAG_INIT_SHARED),
];
pub(crate) const SLOT_FLAGS: &[(&str, u64)] = &[
    ("guest_memfd", KVM_MEM_GUEST_MEMFD as u64),
    ("readonly", KVM_MEM_READONLY as u64),
    ("log_dirty", KVM_MEM_LOG_DIRTY_PAGES as u64),
];
pub(crate) const MBIND_FLAGS: &[(&str, u64)] = &[("strict", 1), ("move", 2), ("move_all", 4)];

fn node_list(cx: &LineCx, t: Tok) -> PResult<NodeMask> {
    t.text.parse().map_err(|e: String| {
        cx.err(
            t.at,
            "a node list",
            t.text,
            &format!("{e}; write nodes as 0, 0,2 or 0-3"),
        )
    })
}

/// `MODE[|FLAG]... [nodes=LIST]`: a policy as `get_mempolicy` reports it.
fn policy_outcome(cx: &LineCx, first: &Tok, rest: &[Tok]) -> PResult<Outcome> {
    let (mode, flags) = MemPolicy::parse_mode(first.text)
        .map_err(|e| cx.err(first.at, "an outcome", first.text, &e))?;
    let mut a = Args::new(cx, rest, "a policy outcome")?;
    let nodes = match a.key("nodes") {
        Some(t) => node_list(cx, t)?,
        None => NodeMask::NONE,
    };
    a.finish(
        cx,
        "a policy outcome",
        "=> MODE[|static|relative|balancing] [nodes=LIST]",
    )?;
    Ok(Outcome::Policy {
        policy: MemPolicy::new(mode, nodes).with_flags(flags),
    })
}

const REQUIRE_HINT: &str = "require takes vm_type:default|sw_protected, memory_attributes, guest_memfd_flag:mmap|init_shared, exit_hypercall, address_spaces:N, or any capability name (pre_fault_memory, guest_memfd_memory_attributes)";

fn cap_names() -> String {
    crate::uapi::CAPS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt_num(cx: &LineCx, a: &mut Args, key: &str) -> PResult<Option<u64>> {
    a.key(key).map(|t| number(cx, t, key)).transpose()
}

fn u32_arg(cx: &LineCx, t: Tok, what: &str) -> PResult<u32> {
    let n = number(cx, t, what)?;
    u32::try_from(n).map_err(|_| {
        cx.err(
            t.at,
            &format!("{what} below 2^32"),
            t.text,
            "this field is 32 bits wide",
        )
    })
}

fn byte_arg(cx: &LineCx, t: Tok) -> PResult<u8> {
    let n = number(cx, t, "byte")?;
    u8::try_from(n).map_err(|_| {
        cx.err(
            t.at,
            "a byte (0 to 0xff)",
            t.text,
            "guest and host accesses move one byte",
        )
    })
}

fn vm_type(cx: &LineCx, t: Tok) -> PResult<u64> {
    match t.text {
        "default" => Ok(KVM_X86_DEFAULT_VM as u64),
        "sw_protected" => Ok(KVM_X86_SW_PROTECTED_VM as u64),
        s => parse_number(s).ok_or_else(|| {
            cx.err(
                t.at,
                "a VM type",
                s,
                "type=default, type=sw_protected or a number (KVM_X86_*_VM)",
            )
        }),
    }
}

fn require(cx: &LineCx, t: Tok) -> PResult<RequireKind> {
    let (name, arg) = match t.text.split_once(':') {
        Some((n, a)) => (n, Some((a, t.at + n.len() + 1))),
        None => (t.text, None),
    };
    let bad_arg = |what: &str, a: &str, at: usize| cx.err(at, what, a, REQUIRE_HINT);
    match (name, arg) {
        ("vm_type", Some((a, at))) => match a {
            "default" => Ok(RequireKind::VmType(KVM_X86_DEFAULT_VM as u64)),
            "sw_protected" => Ok(RequireKind::VmType(KVM_X86_SW_PROTECTED_VM as u64)),
            _ => match parse_number(a) {
                Some(n) if n < 64 => Ok(RequireKind::VmType(n)),
                _ => Err(bad_arg("a VM type (default, sw_protected)", a, at)),
            },
        },
        ("memory_attributes", None) => Ok(RequireKind::MemoryAttributes),
        ("guest_memfd_flag", Some((a, at))) => match a {
            "mmap" => Ok(RequireKind::GuestMemfdFlag(GUEST_MEMFD_FLAG_MMAP)),
            "init_shared" => Ok(RequireKind::GuestMemfdFlag(GUEST_MEMFD_FLAG_INIT_SHARED)),
            _ => Err(bad_arg("a guest_memfd flag (mmap, init_shared)", a, at)),
        },
        ("exit_hypercall", None) => Ok(RequireKind::ExitHypercall),
        ("address_spaces", Some((a, at))) => parse_number(a)
            .map(RequireKind::AddressSpaces)
            .ok_or_else(|| bad_arg("a number of address spaces", a, at)),
        (n, None) if cap_from_name(n).is_some() => {
            Ok(RequireKind::Cap(cap_from_name(n).unwrap_or_default()))
        }
        _ => Err(cx.err(t.at, "a capability to require", t.text, REQUIRE_HINT)),
    }
}

/// Parses the text after `=>`; `base` is its byte offset in the line.
fn outcome(cx: &LineCx, text: &str, base: usize) -> PResult<Outcome> {
    let toks = words(text, base);
    let Some(first) = toks.first() else {
        return Err(cx.err(cx.end(), "an outcome after `=>`", "", OUTCOME_HINT));
    };
    let rest = &toks[1..];
    let only = |o: Outcome| -> PResult<Outcome> {
        match rest.first() {
            Some(t) => Err(cx.err(t.at, "the end of the line", t.text, OUTCOME_HINT)),
            None => Ok(o),
        }
    };
    match first.text {
        "ok" => only(Outcome::Ok),
        "sigbus" => only(Outcome::Sigbus),
        "timeout" => only(Outcome::Timeout),
        "exit" => exit_outcome(cx, first, rest),
        "over" => Err(cx.err(
            first.at,
            "an outcome a kernel gives",
            "over budget",
            "`over budget` is the runner's report of an operation it did not perform; write \
             the kernel's outcome",
        )),
        s if s.starts_with("-KVM_") => match hypercall_return_from_name(s) {
            Some(value) => only(Outcome::HypercallReturn { value }),
            None => Err(cx.err(
                first.at,
                "a hypercall error code",
                s,
                "hypercalls return -KVM_ENOSYS, -KVM_EINVAL, -KVM_EFAULT, -KVM_E2BIG, -KVM_EPERM \
                 or -KVM_EOPNOTSUPP",
            )),
        },
        s if s.starts_with('E') && s.len() > 1 && s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) => {
            match errno_from_name(s) {
                Some(errno) => only(Outcome::Errno { errno }),
                None => Err(cx.err(first.at, "an errno name", s, "errnos are written as the kernel names them: EINVAL, EEXIST, EBADF, ENODEV, EOPNOTSUPP, ESPIPE, ENOTTY, EFAULT")),
            }
        }
        s if s.contains('=') => {
            let mut a = Args::new(cx, &toks, "stat")?;
            let mut get = |k: &str| -> PResult<Option<i64>> { Ok(opt_num(cx, &mut a, k)?.map(|n| n as i64)) };
            let size = get("size")?;
            let blksize = get("blksize")?;
            let blocks = get("blocks")?;
            let mode = get("mode")?.map(|m| m as u32);
            a.finish(cx, "a stat outcome", "=> size=N blksize=N [blocks=N] [mode=N]")?;
            Ok(Outcome::Stat { size, blksize, blocks, mode })
        }
        s if MemPolicy::parse_mode(s).is_ok() => policy_outcome(cx, first, rest),
        s => match parse_number(s) {
            Some(value) => only(Outcome::Value { value, hex: s.starts_with("0x") }),
            None => Err(cx.err(first.at, "an outcome", s, OUTCOME_HINT)),
        },
    }
}

/// `OUTCOME [| RELEASE: OUTCOME]...`: the outcome of the oldest release,
/// then each release from which the outcome differs, in release order.
fn release_outcomes(
    cx: &LineCx,
    text: &str,
    base: usize,
) -> PResult<(Outcome, Vec<(Release, Outcome)>)> {
    let mut parts = text.split(" | ");
    let first = parts.next().unwrap_or_default();
    let expect = outcome(cx, first, base)?;
    let mut since: Vec<(Release, Outcome)> = Vec::new();
    let mut at = base + first.len() + 3;
    for part in parts {
        let Some((rel, out)) = part.split_once(':') else {
            return Err(cx.err(
                at,
                "`RELEASE: OUTCOME` after `|`",
                part.trim(),
                RELEASE_HINT,
            ));
        };
        let rel_at = at + (rel.len() - rel.trim_start().len());
        let release: Release = rel
            .trim()
            .parse()
            .map_err(|e: String| cx.err(rel_at, "a release", rel.trim(), &e))?;
        if release == Release::ALL[0] || since.last().is_some_and(|(r, _)| *r >= release) {
            return Err(cx.err(rel_at, "a later release", rel.trim(), RELEASE_HINT));
        }
        since.push((release, outcome(cx, out, at + rel.len() + 1)?));
        at += part.len() + 3;
    }
    Ok((expect, since))
}

const RELEASE_HINT: &str = "an outcome that changed is written `=> OLD | 7.2: NEW`: the first outcome is the oldest release's (6.18), each `| RELEASE: OUTCOME` holds from that release on, in release order";

const OUTCOME_HINT: &str = "outcomes: ok, an errno (EINVAL), a number (0x42), sigbus, timeout, size=N blksize=N, a policy (bind nodes=0), exit memory_fault gpa=N size=N flags=private|shared, exit mmio gpa=N [read|write], exit hypercall gpa=N pages=N attributes=private|shared";

fn exit_outcome(cx: &LineCx, exit: &Tok, rest: &[Tok]) -> PResult<Outcome> {
    let Some(kind) = rest.first() else {
        return Err(cx.err(
            cx.end(),
            "an exit kind (memory_fault, mmio, hypercall)",
            "",
            OUTCOME_HINT,
        ));
    };
    let _ = exit;
    let mut a = Args::new(cx, &rest[1..], kind.text)?;
    let o = match kind.text {
        "memory_fault" => {
            let usage = "exit memory_fault gpa=N size=N flags=private|shared";
            let gpa = number(cx, need(cx, &mut a, "gpa", "memory_fault", usage)?, "gpa")?;
            let size = number(cx, need(cx, &mut a, "size", "memory_fault", usage)?, "size")?;
            let flags = flags(
                cx,
                need(cx, &mut a, "flags", "memory_fault", usage)?,
                "flags",
                &[
                    ("private", KVM_MEMORY_EXIT_FLAG_PRIVATE as u64),
                    ("shared", 0),
                ],
            )?;
            a.finish(cx, "memory_fault", usage)?;
            Outcome::MemoryFault { gpa, size, flags }
        }
        "mmio" => {
            let usage = "exit mmio gpa=N [read|write]";
            let gpa = number(cx, need(cx, &mut a, "gpa", "mmio", usage)?, "gpa")?;
            let write = match a.pos() {
                Some(t) if t.text == "read" => Some(false),
                Some(t) if t.text == "write" => Some(true),
                Some(t) => return Err(cx.err(t.at, "`read` or `write`", t.text, usage)),
                None => None,
            };
            a.finish(cx, "mmio", usage)?;
            Outcome::Mmio { gpa, write }
        }
        "hypercall" => {
            let usage = "exit hypercall gpa=N pages=N attributes=private|shared";
            let gpa = number(cx, need(cx, &mut a, "gpa", "hypercall", usage)?, "gpa")?;
            let pages = number(cx, need(cx, &mut a, "pages", "hypercall", usage)?, "pages")?;
            let attributes = flags(
                cx,
                need(cx, &mut a, "attributes", "hypercall", usage)?,
                "attributes",
                &[("private", KVM_MAP_GPA_RANGE_ENCRYPTED), ("shared", 0)],
            )?;
            a.finish(cx, "hypercall", usage)?;
            Outcome::Hypercall {
                gpa,
                pages,
                attributes,
            }
        }
        k => {
            return Err(cx.err(
                kind.at,
                "an exit kind (memory_fault, mmio, hypercall)",
                k,
                OUTCOME_HINT,
            ))
        }
    };
    Ok(o)
}

/// Parses one outcome written as in a scenario (`EINVAL`, `0x00`, `exit mmio gpa=0x1000`),
/// as departures record them.
pub fn parse_outcome(text: &str) -> Result<Outcome, ParseError> {
    let cx = LineCx {
        file: "<outcome>",
        line: 1,
        raw: text,
    };
    outcome(&cx, text, 0).map_err(|e| *e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Errno;
    use proptest::prelude::*;

    fn err(text: &str) -> ParseError {
        parse("t.gmem", text).unwrap_err().0.remove(0)
    }

    #[test]
    fn the_example_of_the_format_parses() {
        let text = "\
# The end of a binding is exclusive: a slot may reach the file's last byte, not past it.
vm = create_vm
g  = create_guest_memfd vm size=16K flags=mmap|init_shared
set_memory_region vm slot=1 gpa=0x100000 size=16K flags=guest_memfd guest_memfd=g offset=0
set_memory_region vm slot=2 gpa=0x200000 size=4K flags=guest_memfd guest_memfd=g offset=16K => EINVAL
m  = mmap g
host_write m offset=0 byte=0xaa
guest_read vm gpa=0x100000 => 0xaa
fallocate g mode=punch_hole offset=0 len=4K
guest_read vm gpa=0x100000 => 0x00
";
        let sc = parse("example.gmem", text).unwrap();
        assert_eq!(sc.lines.len(), 9);
        assert_eq!(sc.lines[1].bind.as_deref(), Some("g"));
        assert_eq!(
            sc.lines[3].expect,
            Outcome::Errno {
                errno: Errno::EINVAL
            }
        );
        assert_eq!(sc.lines[6].line, 8);
        assert!(matches!(
            sc.lines[1].op,
            Op::CreateGuestMemfd {
                size: 16384,
                flags: 3,
                ..
            }
        ));
    }

    #[test]
    fn every_outcome_of_the_format_parses() {
        for o in [
            "ok",
            "EINVAL",
            "0x42",
            "sigbus",
            "exit memory_fault gpa=0x1000 size=4096 flags=private",
            "exit mmio gpa=0x1000",
            "exit mmio gpa=0x1000 write",
            "exit hypercall gpa=0x1000 pages=1 attributes=shared",
            "size=4096 blksize=4096",
            "32764",
            "timeout",
            "default",
            "bind|static nodes=0-1,63",
        ] {
            parse_outcome(o).unwrap_or_else(|e| panic!("{o}: {e}"));
        }
    }

    #[test]
    fn numbers_take_hex_suffixes_separators_and_signs() {
        assert_eq!(parse_number("16K"), Some(16384));
        assert_eq!(parse_number("0x1_0000_0000"), Some(1 << 32));
        assert_eq!(parse_number("2M"), Some(2 << 20));
        assert_eq!(parse_number("1T"), Some(1 << 40));
        assert_eq!(parse_number("0xfK"), Some(15 << 10));
        assert_eq!(parse_number("-1"), Some(u64::MAX));
        assert_eq!(parse_number("0o600"), Some(0o600));
        assert_eq!(parse_number("17000000T"), None);
        assert_eq!(parse_number("+1"), None);
        assert_eq!(parse_number("K"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("0x"), None);
    }

    #[test]
    fn unknown_operation_names_line_column_and_the_operations() {
        let e = err("vm = create_vm\n  frobnicate vm\n");
        assert_eq!((e.line, e.column), (2, 3));
        assert_eq!(e.expected, "an operation");
        assert_eq!(e.found, "frobnicate");
        assert!(e.to_string().contains("found `frobnicate`"), "{e}");
        assert!(e.hint.contains("create_guest_memfd"), "{}", e.hint);
    }

    #[test]
    fn missing_argument_points_at_the_end_of_the_line() {
        let e = err("vm = create_vm\ng = create_guest_memfd vm");
        assert_eq!((e.line, e.column), (2, 26));
        assert!(e.expected.contains("size="), "{}", e.expected);
        assert!(e.hint.contains("usage"), "{}", e.hint);
    }

    #[test]
    fn bad_number_has_the_number_hint() {
        let e = err("h = host_memory size=12Q");
        assert_eq!(e.column, 22);
        assert!(e.hint.contains("0x"), "{}", e.hint);
    }

    #[test]
    fn unbound_handle_is_refused_with_how_to_bind_it() {
        let e = err("stat g");
        assert_eq!(e.column, 6);
        assert!(e.hint.contains("g = "), "{}", e.hint);
    }

    #[test]
    fn unknown_errno_and_outcome_are_refused() {
        let e = err("vm = create_vm => EWHATEVER");
        assert_eq!(e.column, 19);
        assert!(e.hint.contains("EINVAL"));
        let e = err("vm = create_vm => maybe");
        assert_eq!(e.expected, "an outcome");
        let e = err("vm = create_vm =>");
        assert_eq!(e.found, "end of line");
    }

    #[test]
    fn unknown_and_repeated_arguments_are_refused() {
        let e = err("h = host_memory size=4K colour=blue");
        assert_eq!(e.column, 25);
        let e = err("h = host_memory size=4K size=8K");
        assert!(e.hint.contains("twice"), "{}", e.hint);
    }

    #[test]
    fn binding_a_non_handle_operation_is_refused() {
        let e = err("vm = create_vm\nx = check_extension vm guest_memfd");
        assert_eq!((e.line, e.column), (2, 1));
    }

    #[test]
    fn require_lines_are_checked() {
        let sc = parse(
            "t",
            "require vm_type:sw_protected memory_attributes address_spaces:2\nvm = create_vm\n",
        )
        .unwrap();
        assert_eq!(sc.requires.len(), 3);
        let e = err("require vm_type:sev_snp_tdx");
        assert_eq!(e.column, 17);
        let e = err("require teleport");
        assert!(e.hint.contains("exit_hypercall"));
    }

    #[test]
    fn every_error_of_a_file_is_reported() {
        let errs = parse("t", "frob\nstat x\nvm = create_vm\n").unwrap_err().0;
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[1].line, 2);
    }

    #[test]
    fn an_empty_scenario_is_an_error() {
        for text in [
            "",
            "\n  \n",
            "# only a comment\n",
            "require memory_attributes\n",
        ] {
            let e = err(text);
            assert_eq!(e.expected, "at least one operation", "{text:?}");
        }
    }

    #[test]
    fn what_one_scenario_can_make_the_runner_hold_is_bounded() {
        let e = err("h = host_memory size=4G\nhost_write h offset=0 byte=1 len=2G\n");
        assert_eq!((e.line, e.column), (2, 34));
        assert!(e.expected.contains("at most 1G"), "{}", e.expected);
        assert_eq!(e.found, "2G", "as written, not in bytes");
        let many = "check_extension guest_memfd\n".repeat(MAX_OPERATIONS + 1);
        let e = err(&many);
        assert_eq!(e.line, MAX_OPERATIONS + 1);
        assert!(e.expected.contains("100000 operations"), "{}", e.expected);
        let huge = "#".repeat(MAX_SCENARIO_BYTES + 1);
        assert!(err(&huge).expected.contains("16 MiB"));
    }

    #[test]
    fn a_utf8_bom_is_ignored() {
        let sc = parse("t", "\u{feff}vm = create_vm\n").unwrap();
        assert_eq!(sc.lines[0].bind.as_deref(), Some("vm"));
    }

    #[test]
    fn binding_a_name_twice_is_an_error_naming_the_first_line() {
        let e = err("vm = create_vm\nh = host_memory size=4K\nclose h\nh = host_memory size=4K\n");
        assert_eq!((e.line, e.column), (4, 1));
        assert!(e.hint.contains("already bound on line 2"), "{}", e.hint);
    }

    #[test]
    fn numbers_beyond_64_bits_say_so() {
        for n in [
            "0x1_0000_0000_0000_0000",
            "18446744073709551616",
            "17000000T",
        ] {
            let e = err(&format!("h = host_memory size={n}"));
            assert!(
                e.expected.contains("fits in 64 bits"),
                "{n}: {}",
                e.expected
            );
        }
        let e = err("h = host_memory size=0xfoo");
        assert_eq!(e.expected, "a number for size");
    }

    #[test]
    fn very_long_tokens_are_shortened_in_messages() {
        let long = "x".repeat(10_000);
        let e = err(&format!("vm = create_vm\n{long} vm\n"));
        assert!(e.found.chars().count() <= 42, "{}", e.found);
        assert!(e.found.contains('…'));
        assert_eq!(shorten("abcdefghij", 7), "abcd…ij");
        assert_eq!(shorten("short", 7), "short");
    }

    #[test]
    fn hypercall_returns_are_written_and_printed_as_errno_names() {
        let sc = parse(
            "t",
            "vm = create_vm\nguest_map_gpa_range vm gpa=0 pages=1 shared => -KVM_ENOSYS\nguest_map_gpa_range vm gpa=1 pages=1 shared => 0\n",
        )
        .unwrap();
        assert_eq!(sc.lines[1].expect.to_string(), "-KVM_ENOSYS");
        assert_eq!(sc.lines[2].expect, Outcome::HypercallReturn { value: 0 });
        assert_eq!(
            Outcome::HypercallReturn {
                value: 22u64.wrapping_neg()
            }
            .to_string(),
            "-KVM_EINVAL"
        );
        let e = err("vm = create_vm\nguest_map_gpa_range vm gpa=0 pages=1 shared => -KVM_EWHAT\n");
        assert!(e.hint.contains("-KVM_ENOSYS"), "{}", e.hint);
    }

    #[test]
    fn over_budget_is_not_an_expectation() {
        let e = err("vm = create_vm => over budget\n");
        assert!(e.hint.contains("runner"), "{}", e.hint);
    }

    #[test]
    fn comments_may_follow_a_line() {
        let sc = parse("t", "vm = create_vm # the VM\n  # only a comment\n").unwrap();
        assert_eq!(sc.lines.len(), 1);
        assert_eq!(sc.lines[0].text, "vm = create_vm");
    }

    #[test]
    fn an_outcome_may_change_from_a_release_on() {
        let sc = parse(
            "t",
            "vm = create_vm\ncheck_extension vm 10 => 1 | 7.2: EEXIST | next: 3\n",
        )
        .unwrap();
        let l = &sc.lines[1];
        assert_eq!(
            l.expect_on(Release::V6_18),
            Outcome::Value {
                value: 1,
                hex: false
            }
        );
        assert_eq!(
            l.expect_on(Release::V7_1),
            Outcome::Value {
                value: 1,
                hex: false
            }
        );
        assert_eq!(l.expect_on(Release::V7_2), parse_outcome("EEXIST").unwrap());
        assert_eq!(
            l.expect_on(Release::Next),
            Outcome::Value {
                value: 3,
                hex: false
            }
        );
        let eexist = parse_outcome("EEXIST").unwrap();
        assert_eq!(l.releases_matching(&eexist), vec![Release::V7_2]);
        assert!(l.accepts(None, &eexist));
        assert!(!l.accepts(Some(Release::V6_18), &eexist));
    }

    #[test]
    fn release_outcomes_must_name_later_releases_in_order() {
        for (text, expected) in [
            ("vm = create_vm => ok | 7.3: EINVAL", "a release"),
            (
                "vm = create_vm => ok | 7.2: EINVAL | 7.0: ok",
                "a later release",
            ),
            ("vm = create_vm => ok | 6.18: EINVAL", "a later release"),
            (
                "vm = create_vm => ok | EINVAL",
                "`RELEASE: OUTCOME` after `|`",
            ),
        ] {
            let e = parse("t", text).unwrap_err();
            assert_eq!(e.0[0].expected, expected, "{text}");
        }
    }

    fn vocabulary() -> impl Strategy<Value = String> {
        let words = prop::sample::select(vec![
            "vm",
            "g",
            "m",
            "h",
            "=",
            "=>",
            "|",
            "#",
            "create_vm",
            "create_guest_memfd",
            "set_memory_region",
            "delete_memory_region",
            "set_memory_attributes",
            "fallocate",
            "mmap",
            "host_write",
            "host_read",
            "guest_read",
            "guest_write",
            "guest_map_gpa_range",
            "check_extension",
            "close",
            "stat",
            "require",
            "size=",
            "size=4K",
            "flags=mmap|",
            "slot=",
            "gpa=0x",
            "offset=-",
            "0x",
            "16K",
            "EINVAL",
            "exit",
            "mmio",
            "memory_fault",
            "gpa=1",
            "private",
            "shared",
            "ok",
            "type=sw_protected",
            "vm_type:",
            "guest_memfd=",
            "userspace=h",
            "é",
            "\t",
            "0xffffffffffffffffff",
            "-",
            "K",
            "=>=>",
            "a=b=c",
        ]);
        prop::collection::vec(
            (words, prop::sample::select(vec![" ", "", "\n", "  "])),
            0..40,
        )
        .prop_map(|v| v.into_iter().map(|(w, s)| format!("{w}{s}")).collect())
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Ok),
            Just(Outcome::Sigbus),
            Just(Outcome::Timeout),
            (1i32..134).prop_map(|e| Outcome::Errno {
                errno: Errno::from_raw(e)
            }),
            (any::<u64>(), any::<bool>()).prop_map(|(value, hex)| Outcome::Value { value, hex }),
            (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(gpa, size, flags)| Outcome::MemoryFault { gpa, size, flags }),
            (any::<u64>(), any::<bool>()).prop_map(|(gpa, w)| Outcome::Mmio {
                gpa,
                write: Some(w)
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(gpa, pages, attributes)| {
                Outcome::Hypercall {
                    gpa,
                    pages,
                    attributes,
                }
            }),
            (0usize..7, 0u16..8, any::<u64>()).prop_map(|(m, f, n)| Outcome::Policy {
                policy: gmem_policy(m, f, n)
            }),
            (any::<i64>(), any::<i64>()).prop_map(|(s, b)| Outcome::Stat {
                size: Some(s),
                blksize: Some(b),
                blocks: None,
                mode: None
            }),
        ]
    }

    fn gmem_policy(mode: usize, flags: u16, nodes: u64) -> MemPolicy {
        use crate::mempolicy::{ModeFlags, MpolMode};
        MemPolicy::new(MpolMode::ALL[mode], NodeMask(nodes))
            .with_flags(ModeFlags::from_bits_truncate(flags << 13))
    }

    #[test]
    fn madvise_parses() {
        let sc = parse(
            "t",
            "vm = create_vm\ng = create_guest_memfd vm size=4M flags=mmap|init_shared\nm = mmap g\n\
             madvise m offset=2M size=2M advice=collapse => EINVAL\nmadvise m advice=populate_write\n",
        )
        .unwrap();
        assert_eq!(
            sc.lines[3].op,
            Op::Madvise {
                mem: "m".into(),
                offset: 2 << 20,
                size: Some(2 << 20),
                advice: crate::madvise::Advice::Collapse,
            }
        );
        assert!(matches!(
            sc.lines[4].op,
            Op::Madvise {
                size: None,
                offset: 0,
                ..
            }
        ));
        for (text, expected) in [
            ("madvise m advice=squash", "an advice"),
            ("madvise m size=4K", "`advice=` for madvise"),
            ("madvise advice=remove", "host memory or a mapping"),
        ] {
            let e = parse(
                "t",
                &format!("vm = create_vm\ng = create_guest_memfd vm size=8K\nm = mmap g\n{text}\n"),
            )
            .unwrap_err();
            assert_eq!(e.0[0].expected, expected, "{text}");
        }
    }

    #[test]
    fn mbind_and_get_mempolicy_parse() {
        let sc = parse(
            "t",
            "vm = create_vm\ng = create_guest_memfd vm size=8K flags=mmap|init_shared\nm = mmap g\n\
             mbind m offset=4K size=4K policy=bind|static nodes=0,2-3 flags=strict|move\n\
             get_mempolicy m offset=4K => bind|static nodes=0,2-3 | 6.19: default\n",
        )
        .unwrap();
        let Op::Mbind {
            policy,
            flags,
            size,
            ..
        } = &sc.lines[3].op
        else {
            panic!("{:?}", sc.lines[3].op)
        };
        assert_eq!(policy.to_string(), "bind|static nodes=0,2-3");
        assert_eq!(flags.bits(), 3);
        assert_eq!(*size, Some(4096));
        assert_eq!(sc.lines[4].expect.to_string(), "bind|static nodes=0,2-3");
        assert_eq!(sc.lines[4].since[0].1.to_string(), "default");
        for (text, expected) in [
            ("mbind m policy=firsttouch", "a policy mode"),
            ("mbind m policy=bind nodes=64", "a node list"),
            ("mbind m policy=bind flags=lazy", "a flag of flags"),
            ("mbind m nodes=0", "`policy=` for mbind"),
            (
                "get_mempolicy m => bind nodes=0 colour=red",
                "an argument of a policy outcome",
            ),
        ] {
            let e = parse(
                "t",
                &format!("vm = create_vm\ng = create_guest_memfd vm size=8K\nm = mmap g\n{text}\n"),
            )
            .unwrap_err();
            assert_eq!(e.0[0].expected, expected, "{text}");
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = parse("fuzz.gmem", &text);
        }

        #[test]
        fn parser_never_panics_on_scenario_like_text(text in vocabulary()) {
            if let Err(errs) = parse("fuzz.gmem", &text) {
                for e in errs.0 {
                    prop_assert!(e.line >= 1 && e.column >= 1);
                    prop_assert!(!e.hint.is_empty() && !e.expected.is_empty());
                }
            }
        }

        #[test]
        fn outcomes_print_as_they_parse(o in outcome()) {
            prop_assume!(!matches!(o, Outcome::Errno { errno } if errno == Errno::UnknownErrno));
            let back = parse_outcome(&o.to_string()).unwrap();
            prop_assert!(back.accepts(&o) && o.accepts(&back), "{} -> {:?}", o, back);
        }
    }
}

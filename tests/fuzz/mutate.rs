//! Mutations of valid files: bytes, text, JSON trees and safetensors headers.

use super::*;

/// A change to the raw bytes of a file.
#[derive(Clone, Debug)]
pub enum ByteEdit {
    /// Keep only the first bytes.
    Truncate(Index),
    Flip(Index, u8),
    /// Overwrite 8 bytes with a little-endian number (a length, an offset, a count).
    Put64(Index, u64),
    /// Insert bytes, often not UTF-8.
    Insert(Index, Vec<u8>),
    Delete(Index, u8),
    Empty,
}

pub fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(1 << 32),
        Just(1 << 40),
        Just(u32::MAX as u64),
        0..64u64,
        any::<u64>()
    ]
}

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let odd = prop_oneof![Just(0xffu8), Just(0xc3), Just(0x80), Just(0), Just(b'"'), Just(b'\n'), any::<u8>()];
    prop_oneof![
        3 => any::<Index>().prop_map(ByteEdit::Truncate),
        4 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        2 => (any::<Index>(), huge()).prop_map(|(i, v)| ByteEdit::Put64(i, v)),
        2 => (any::<Index>(), prop::collection::vec(odd, 1..6)).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        1 => (any::<Index>(), 1..64u8).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        1 => Just(ByteEdit::Empty),
    ]
}

pub fn apply_bytes(data: &mut Vec<u8>, e: &ByteEdit) {
    let at = |i: &Index, n: usize| if n == 0 { 0 } else { i.index(n) };
    match e {
        ByteEdit::Truncate(i) => data.truncate(at(i, data.len())),
        ByteEdit::Flip(i, m) if !data.is_empty() => {
            let k = at(i, data.len());
            data[k] ^= m;
        }
        ByteEdit::Put64(i, v) if data.len() >= 8 => {
            let k = at(i, data.len() - 7);
            data[k..k + 8].copy_from_slice(&v.to_le_bytes());
        }
        ByteEdit::Insert(i, b) => {
            let k = at(i, data.len() + 1);
            data.splice(k..k, b.iter().copied());
        }
        ByteEdit::Delete(i, n) if !data.is_empty() => {
            let k = at(i, data.len());
            let end = (k + *n as usize).min(data.len());
            data.drain(k..end);
        }
        ByteEdit::Empty => data.clear(),
        _ => {}
    }
}

/// Literals written over a number of a JSON file: out of range, non-finite, negative, fractional.
pub const JSON_NUMBERS: &[&str] = &[
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-1",
    "0",
    "1.5",
    "-0",
    "1e-400",
    "4294967296",
    "18446744073709551616",
    "1000000000000",
    "100000",
    "1e308",
    "null",
    "\"7\"",
];
/// Literals written over the value of a `key = value` line of a TOML file.
pub const TOML_VALUES: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "+nan",
    "1e999",
    "-1",
    "0",
    "9223372036854775808",
    "1000000000000",
    "1e12",
    "1.5",
    "\"x\"",
    "[]",
    "{}",
    "true",
    "0.0",
    "1e-320",
    "[1, \"a\"]",
];
/// Fragments inserted anywhere into a text file.
pub const FRAGMENTS: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "=",
    "\\",
    "\\u0000",
    "\\ud800",
    "\u{feff}",
    "null",
    "\n",
    "#",
    "[train]\n",
    "a.b.c = 1\n",
    "\u{0}",
    "é",
];

/// A change to a text file: a number or value replaced, a fragment inserted, or a byte edit.
#[derive(Clone, Debug)]
pub enum TextEdit {
    Number(Index, Index),
    Insert(Index, Index),
    /// Arrays nested this deep (a stack-depth attack on recursive parsers).
    Deep(Index, u16),
    Bytes(ByteEdit),
}

pub fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        4 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TextEdit::Number(a, b)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TextEdit::Insert(a, b)),
        1 => (any::<Index>(), 100..20_000u16).prop_map(|(a, d)| TextEdit::Deep(a, d)),
        3 => byte_edit().prop_map(TextEdit::Bytes),
    ]
}

/// The byte ranges of the numbers of a JSON text, or of the values of a TOML text's lines.
pub fn value_spans(text: &[u8], toml: bool) -> Vec<(usize, usize)> {
    let mut out = vec![];
    if toml {
        let mut start = 0;
        for line in text.split(|&b| b == b'\n') {
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                out.push((start + eq + 1, start + line.len()));
            }
            start += line.len() + 1;
        }
        return out;
    }
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        let starts = (b.is_ascii_digit() || b == b'-') && (i == 0 || !text[i - 1].is_ascii_alphanumeric());
        if starts {
            let j = i + 1 + text[i + 1..].iter().take_while(|c| c.is_ascii_digit() || b".eE+-".contains(c)).count();
            out.push((i, j));
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

pub fn apply_text(data: &mut Vec<u8>, e: &TextEdit, toml: bool) {
    match e {
        TextEdit::Number(which, lit) => {
            let spans = value_spans(data, toml);
            if spans.is_empty() {
                return;
            }
            let (a, b) = spans[which.index(spans.len())];
            let lits = if toml { TOML_VALUES } else { JSON_NUMBERS };
            let l = lits[lit.index(lits.len())];
            data.splice(a..b, if toml { format!(" {l}") } else { l.to_string() }.into_bytes());
        }
        TextEdit::Insert(at, frag) => {
            let k = at.index(data.len() + 1);
            data.splice(k..k, FRAGMENTS[frag.index(FRAGMENTS.len())].bytes());
        }
        TextEdit::Deep(at, depth) => {
            let k = at.index(data.len() + 1);
            let d = *depth as usize;
            let deep: Vec<u8> = (0..d).map(|_| b'[').chain((0..d).map(|_| b']')).collect();
            let deep = if toml { [b"\nzz = ".as_slice(), &deep, b"\n"].concat() } else { deep };
            data.splice(k..k, deep);
        }
        TextEdit::Bytes(b) => apply_bytes(data, b),
    }
}

/// A change to the JSON tree of a file: a node replaced by an odd value, or removed.
#[derive(Clone, Debug)]
pub enum JsonEdit {
    Replace(Index, Index),
    Remove(Index),
}

pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        3 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| JsonEdit::Replace(a, b)),
        1 => any::<Index>().prop_map(JsonEdit::Remove),
    ]
}

pub fn odd_values() -> Vec<Value> {
    serde_json::from_str(
        r#"[null, true, false, -1, 0, 1, 3, 100000, 4294967296, 18446744073709551615, 1e308, -1e308, 0.5, 1e-300, "",
            "gelu", "LORA", "x\u0000", [], {}, [1, 2], {"a": 1}, [["a", "b"]], "a b c"]"#,
    )
    .expect("valid JSON")
}

/// JSON pointers of every node below the root.
pub fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| {
            let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            out.push(p.clone());
            pointers(x, p, out);
        }),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| {
            let p = format!("{at}/{i}");
            out.push(p.clone());
            pointers(x, p, out);
        }),
        _ => {}
    }
}

pub fn apply_json(v: &mut Value, e: &JsonEdit) {
    let mut ps = vec![];
    pointers(v, String::new(), &mut ps);
    let pick = |i: &Index| if ps.is_empty() { None } else { Some(ps[i.index(ps.len())].clone()) };
    match e {
        JsonEdit::Replace(node, val) => {
            let vals = odd_values();
            if let Some(slot) = pick(node).and_then(|p| v.pointer_mut(&p)) {
                *slot = vals[val.index(vals.len())].clone();
            }
        }
        JsonEdit::Remove(node) => {
            let Some(p) = pick(node) else { return };
            let (parent, key) = p.rsplit_once('/').expect("a pointer has a slash");
            match v.pointer_mut(parent) {
                Some(Value::Object(m)) => drop(m.remove(&key.replace("~1", "/").replace("~0", "~"))),
                Some(Value::Array(a)) => drop(a.remove(key.parse::<usize>().expect("an index"))),
                _ => {}
            }
        }
    }
}

/// A change to a JSON file: to its tree (kept valid JSON) or to its text.
#[derive(Clone, Debug)]
pub enum JsonFileEdit {
    Tree(JsonEdit),
    Text(TextEdit),
}

pub fn json_file_edits() -> impl Strategy<Value = Vec<JsonFileEdit>> {
    let one = prop_oneof![
        3 => json_edit().prop_map(JsonFileEdit::Tree),
        2 => text_edit().prop_map(JsonFileEdit::Text),
    ];
    prop::collection::vec(one, 1..4)
}

pub fn apply_json_file(seed: &[u8], edits: &[JsonFileEdit]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for e in edits {
        match e {
            JsonFileEdit::Tree(t) => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&data) {
                    apply_json(&mut v, t);
                    data = serde_json::to_vec_pretty(&v).expect("a JSON value serialises");
                }
            }
            JsonFileEdit::Text(t) => apply_text(&mut data, t, false),
        }
    }
    data
}

pub fn text_edits() -> impl Strategy<Value = Vec<TextEdit>> {
    prop::collection::vec(text_edit(), 1..4)
}

// ---------------------------------------------------------------------------------------------
// safetensors mutations: the header is rewritten (its length kept consistent), so changes reach
// past the `safetensors` crate's own checks into kiln's.

#[derive(Clone, Debug)]
pub enum StEdit {
    /// Another dtype name, of the same width or not.
    Dtype(Index, Index),
    /// Dims permuted, flattened, extended, cut, or one set to a huge value.
    Shape(Index, u8, u64),
    Offsets(Index, u64, u64),
    /// A tensor renamed to another's name, to a near miss, or to junk.
    Rename(Index, Index),
    Drop(Index),
    /// A NaN, an infinity or an extreme written into a tensor's data.
    Value(Index, Index, Index),
    Bytes(ByteEdit),
}

pub const DTYPES: &[&str] =
    &["F32", "BF16", "F16", "I32", "I64", "U8", "F64", "I8", "U16", "BOOL", "F8_E4M3", "F4", "U64", "Q4"];

pub fn st_edit() -> impl Strategy<Value = StEdit> {
    prop_oneof![
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| StEdit::Dtype(a, b)),
        2 => (any::<Index>(), 0..6u8, huge()).prop_map(|(a, k, v)| StEdit::Shape(a, k, v)),
        1 => (any::<Index>(), huge(), huge()).prop_map(|(a, s, e)| StEdit::Offsets(a, s, e)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| StEdit::Rename(a, b)),
        1 => any::<Index>().prop_map(StEdit::Drop),
        3 => (any::<Index>(), any::<Index>(), any::<Index>()).prop_map(|(a, b, c)| StEdit::Value(a, b, c)),
        3 => byte_edit().prop_map(StEdit::Bytes),
    ]
}

pub fn st_edits() -> impl Strategy<Value = Vec<StEdit>> {
    prop::collection::vec(st_edit(), 1..4)
}

/// Splits a safetensors file into its header object and data; None when it no longer parses.
pub fn st_split(file: &[u8]) -> Option<(serde_json::Map<String, Value>, Vec<u8>)> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice::<Value>(file.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header.as_object()?.clone(), file[8 + n..].to_vec()))
}

pub fn st_join(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("a JSON value serialises");
    [&(h.len() as u64).to_le_bytes()[..], &h, data].concat()
}

pub fn apply_st(file: &mut Vec<u8>, e: &StEdit) {
    if let StEdit::Bytes(b) = e {
        return apply_bytes(file, b);
    }
    let Some((mut header, mut data)) = st_split(file) else { return };
    let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return;
    }
    let pick = |i: &Index| names[i.index(names.len())].clone();
    match e {
        StEdit::Dtype(t, d) => header[&pick(t)]["dtype"] = DTYPES[d.index(DTYPES.len())].into(),
        StEdit::Shape(t, kind, v) => {
            let entry = &mut header[&pick(t)]["shape"];
            let mut dims: Vec<u64> = serde_json::from_value(entry.clone()).unwrap_or_default();
            match kind {
                0 => dims.reverse(),
                1 => dims = vec![dims.iter().product()],
                2 => dims.push(1),
                3 => drop(dims.pop()),
                4 if !dims.is_empty() => dims[0] = *v,
                _ => dims.insert(0, *v),
            }
            *entry = dims.into();
        }
        StEdit::Offsets(t, s, end) => header[&pick(t)]["data_offsets"] = vec![*s, *end].into(),
        StEdit::Rename(t, to) => {
            let from = pick(t);
            let other = pick(to);
            let new = match to.index(3) {
                0 => other,
                1 => format!("{from}.x"),
                _ => from.replacen("weight", "wieght", 1),
            };
            if let Some(v) = header.remove(&from) {
                header.insert(new, v);
            }
        }
        StEdit::Drop(t) => drop(header.remove(&pick(t))),
        StEdit::Value(t, at, what) => {
            let entry = &header[&pick(t)];
            let dtype = entry["dtype"].as_str().unwrap_or("");
            let (s, end) = (entry["data_offsets"][0].as_u64(), entry["data_offsets"][1].as_u64());
            let (Some(s), Some(end)) = (s, end) else { return };
            let (s, end) = (s as usize, (end as usize).min(data.len()));
            let width = match dtype {
                "F32" | "I32" => 4,
                "BF16" | "F16" => 2,
                "I64" => 8,
                "U8" => 1,
                _ => return,
            };
            if end <= s || end - s < width {
                return;
            }
            let k = s + at.index((end - s) / width) * width;
            let f = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -0.0, 1e-45][what.index(6)];
            let ints: [i64; 6] = [-1, -100, i64::MAX, i64::MIN, 1 << 31, 1 << 40];
            let bytes: Vec<u8> = match dtype {
                "F32" => f.to_le_bytes().to_vec(),
                "BF16" => half::bf16::from_f32(f).to_le_bytes().to_vec(),
                "F16" => half::f16::from_f32(f).to_le_bytes().to_vec(),
                "I32" => (ints[what.index(6)] as i32).to_le_bytes().to_vec(),
                // NF4 codes, and the JSON quant state bitsandbytes stores as U8 bytes
                "U8" => vec![[b'9', b'}', b'"', 0xff, b'-', b'e'][what.index(6)]],
                _ => ints[what.index(6)].to_le_bytes().to_vec(),
            };
            data[k..k + width].copy_from_slice(&bytes);
        }
        StEdit::Bytes(_) => unreachable!(),
    }
    *file = st_join(&header, &data);
}

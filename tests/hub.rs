//! `kiln download` and Hub ids against a Hugging Face Hub on 127.0.0.1: a small server (below)
//! that serves a directory in the Hub's URL layout (`/{repo}/resolve/{revision}/{file}`,
//! `/datasets/{repo}/resolve/...`, `/api/{models|datasets}/{repo}/revision/{revision}`) with the
//! headers hf-hub reads (x-repo-commit, etag, Content-Range for a Range request). The files are
//! made here: a tiny Llama checkpoint and a Parquet dataset with a "text" column.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// A Hub on 127.0.0.1 serving `root/models/<repo>/...` and `root/datasets/<repo>/...`; counts
/// the file requests it answers, by path.
struct Hub {
    url: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

fn files_under(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, root, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

fn respond(stream: &mut std::net::TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

impl Hub {
    fn start(root: PathBuf) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let counter = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("range") {
                            range = Some(v.trim().to_string());
                        }
                    }
                }
                // /api/{models|datasets}/{org}/{name}/revision/{rev}
                if let Some(rest) = path.strip_prefix("/api/") {
                    let parts: Vec<&str> = rest.split('/').collect();
                    let dir = root.join(parts[0]).join(parts[1]).join(parts[2]);
                    if parts.len() == 5 && dir.is_dir() {
                        let mut files = vec![];
                        files_under(&dir, &dir, &mut files);
                        files.sort();
                        let siblings: Vec<_> = files.iter().map(|f| serde_json::json!({"rfilename": f})).collect();
                        let body = serde_json::json!({"sha": SHA, "siblings": siblings}).to_string();
                        respond(
                            &mut stream,
                            "200 OK",
                            &[("Content-Type".into(), "application/json".into())],
                            body.as_bytes(),
                        );
                    } else {
                        respond(&mut stream, "404 Not Found", &[], b"{\"error\":\"Repository not found\"}");
                    }
                    continue;
                }
                // /{org}/{name}/resolve/{rev}/{file} or /datasets/{org}/{name}/resolve/{rev}/{file}
                let (kind, rest) = match path.strip_prefix("/datasets/") {
                    Some(r) => ("datasets", r.to_string()),
                    None => ("models", path[1..].to_string()),
                };
                let parts: Vec<&str> = rest.splitn(5, '/').collect();
                let file = (parts.len() == 5 && parts[2] == "resolve")
                    .then(|| root.join(kind).join(parts[0]).join(parts[1]).join(parts[4]));
                match file.filter(|f| f.is_file()) {
                    None => {
                        respond(&mut stream, "404 Not Found", &[("X-Error-Code".into(), "EntryNotFound".into())], b"")
                    }
                    Some(f) => {
                        let data = std::fs::read(&f).unwrap();
                        if range.as_deref() != Some("bytes=0-0") {
                            *counter.lock().unwrap().entry(path.clone()).or_default() += 1;
                        }
                        let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                            Some(r) => {
                                let (a, b) = r.split_once('-').unwrap();
                                let a: usize = a.parse().unwrap();
                                let b = if b.is_empty() { data.len().saturating_sub(1) } else { b.parse().unwrap() };
                                (a, b.min(data.len().saturating_sub(1)))
                            }
                            None => (0, data.len().saturating_sub(1)),
                        };
                        // an etag per content, as the Hub's (a sha256 for LFS files)
                        let etag: u64 = data
                            .iter()
                            .fold(1469598103934665603u64, |h, &b| (h ^ b as u64).wrapping_mul(1099511628211));
                        let headers = vec![
                            ("x-repo-commit".to_string(), SHA.to_string()),
                            ("ETag".to_string(), format!("\"{etag:016x}{:x}\"", data.len())),
                            ("Content-Range".to_string(), format!("bytes {start}-{end}/{}", data.len())),
                        ];
                        let body = if data.is_empty() { &data[..] } else { &data[start..=end] };
                        respond(&mut stream, "206 Partial Content", &headers, body);
                    }
                }
                let _ = stream.flush();
                let mut sink = [0u8; 1];
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(1)));
                let _ = stream.read(&mut sink);
            }
        });
        Hub { url, hits }
    }

    fn file_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

/// A Parquet file with one "text" column (snappy pages, as `datasets` writes them).
fn write_parquet(path: &Path, rows: &[&str]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type("message schema { REQUIRED BYTE_ARRAY text (UTF8); }").unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(*r)).collect();
    col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

fn kiln(hub: &Hub, hf_home: &Path, args: &[&str]) -> std::process::Output {
    common::cli::kiln_command()
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn download_a_model_and_a_dataset_into_the_standard_cache_and_use_them_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    // the model: a tiny Llama with a tokenizer
    let (_, text) = kiln::data::synthetic::default_corpus(60_000);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, &text).unwrap();
    let tok = kiln::data::tokenizer::train_bpe(&[corpus], 300, 2).unwrap();
    let mut cfg = kiln::LlamaConfig::preset("llama-tiny").unwrap();
    cfg.vocab_size = tok.id_bound();
    cfg.num_hidden_layers = 2;
    let model = kiln::Model::new_random(cfg, 1).unwrap();
    let mdir = root.join("models/org/tiny-llama");
    kiln::io::checkpoint::save_model(&model, &mdir, kiln::DType::F32).unwrap();
    tok.save(&mdir.join("tokenizer.json")).unwrap();
    // the dataset: two subsets in the Hub's Parquet layout
    let lines: Vec<&str> = text.split(". ").filter(|l| !l.is_empty()).collect();
    assert!(lines.len() > 460, "{} sentences", lines.len());
    let ddir = root.join("datasets/org/wiki");
    write_parquet(&ddir.join("small/train-00000-of-00001.parquet"), &lines[..400]);
    write_parquet(&ddir.join("small/test-00000-of-00001.parquet"), &lines[400..450]);
    write_parquet(&ddir.join("other/train-00000-of-00001.parquet"), &lines[450..460]);
    let hub = Hub::start(root);
    let hf_home = tmp.path().join("hf");

    // the model, into $HF_HOME/hub in huggingface_hub's layout
    let out = ok(&kiln(&hub, &hf_home, &["download", "org/tiny-llama"]), "kiln download org/tiny-llama");
    assert!(out.contains("Llama"), "{out}");
    let cached = hf_home.join("hub/models--org--tiny-llama");
    assert_eq!(std::fs::read_to_string(cached.join("refs/main")).unwrap().trim(), SHA);
    let snapshot = cached.join("snapshots").join(SHA);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(snapshot.join(f).is_file(), "{f} not in the snapshot");
    }
    let fetched = hub.file_hits();
    assert_eq!(fetched, 3, "config, weights, tokenizer (absent side files are 404s, not downloads)");
    // used by id: from the cache, with no file fetched again
    let batch = tmp.path().join("batch.safetensors");
    let ids = kiln::bench::random_tokens(tok.id_bound(), 2, 16, 1).unwrap();
    kiln::io::safetensors::save(&batch, &[("input_ids".to_string(), ids)], &[]).unwrap();
    let out = ok(
        &kiln(&hub, &hf_home, &["eval", "--model", "org/tiny-llama", "--batch", batch.to_str().unwrap()]),
        "eval by id",
    );
    assert!(out.contains("loss"), "{out}");
    assert_eq!(hub.file_hits(), fetched, "a cached model was fetched again");
    let direct = kiln::io::checkpoint::load_model(&snapshot).unwrap();
    assert_eq!(
        direct.params.get("model.norm.weight").unwrap().f32s().unwrap(),
        model.params.get("model.norm.weight").unwrap().f32s().unwrap()
    );

    // one subset's split of the dataset
    let out = ok(
        &kiln(&hub, &hf_home, &["download", "org/wiki", "--dataset", "--subset", "small", "--split", "train"]),
        "kiln download --dataset",
    );
    assert!(out.contains("1 Parquet files"), "{out}");
    let pq = hf_home.join("hub/datasets--org--wiki/snapshots").join(SHA).join("small/train-00000-of-00001.parquet");
    assert_eq!(
        kiln::data::corpus::read_documents(&pq).unwrap(),
        lines[..400].iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );
    assert!(
        !hf_home.join("hub/datasets--org--wiki/snapshots").join(SHA).join("other").exists(),
        "another subset was fetched"
    );

    // pre-training reads it by id, from the cache
    let before = hub.file_hits();
    let run = tmp.path().join("run");
    let out = ok(
        &kiln(
            &hub,
            &hf_home,
            &[
                "pretrain",
                "--preset",
                "llama-tiny",
                "--data",
                "org/wiki:small/train",
                "--tokenizer",
                snapshot.join("tokenizer.json").to_str().unwrap(),
                "--max-steps",
                "3",
                "--set",
                "train.batch_size=2",
                "--set",
                "train.seq_len=32",
                "--out",
                run.to_str().unwrap(),
            ],
        ),
        "pretrain --data org/wiki:small/train",
    );
    assert!(out.contains("done at step 3"), "{out}");
    assert_eq!(hub.file_hits(), before, "a cached dataset file was fetched again");

    // what is not there says so
    let o = kiln(&hub, &hf_home, &["download", "org/missing"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("org/missing") && e.contains("no such repository"), "{e}");
    let o = kiln(&hub, &hf_home, &["download", "org/wiki", "--dataset", "--subset", "nope"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("subset nope") && e.contains("small/train"), "{e}");
}

#[test]
fn hub_ids_and_paths_are_told_apart() {
    use kiln::io::hub::is_hub_id;
    assert!(is_hub_id("gpt2"));
    assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M"));
    assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M@main"));
    assert!(!is_hub_id("runs/demo/checkpoints/step-00001200"), "three components is a path");
    assert!(!is_hub_id("./model"));
    assert!(!is_hub_id("data.parquet/x y"));
    assert!(!is_hub_id("tests"), "an existing directory is a path");
    // --data: a missing file stays a missing file (no network), an org/name or an explicit
    // subset is a dataset
    use kiln::io::hub::dataset_input;
    for missing in ["corpus.txt", "data/train.jsonl", "notes", "wiki.parquet"] {
        assert!(dataset_input(missing).unwrap().is_none(), "{missing} taken for a Hub dataset");
    }
    let e = kiln::data::corpus::expand_inputs(&["corpus.txt".to_string()]).unwrap_err().to_string();
    assert!(e.contains("corpus.txt") && e.contains("no such file"), "{e}");
}

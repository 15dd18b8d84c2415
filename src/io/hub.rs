//! The Hugging Face Hub: `kiln download`, and a Hub id wherever a command takes a model directory
//! or training data, as `from_pretrained("...")` and `load_dataset("...")` take one.
//!
//! Files go through the hf-hub crate into the standard cache ($HF_HOME/hub, by default
//! ~/.cache/huggingface/hub) in huggingface_hub's layout (blobs, snapshots, refs), so what Python
//! already fetched is not fetched again and what kiln fetches serves transformers too.
//! `HF_ENDPOINT` points the downloads at a mirror, `HF_TOKEN` (or the cached token) authenticates.
//! A model is its config.json, weights (one file, or an index and its shards) and the tokenizer
//! and generation files it has; a dataset is its Parquet files, optionally of one subset
//! ("config") and split.

use crate::{Error, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Files of a model repository besides the weights, fetched when present.
const MODEL_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// Whether `s` reads as a Hub repository id ("gpt2", "HuggingFaceTB/SmolLM2-135M", an optional
/// "@revision"): one or two names of letters, digits, '-', '_' and '.', not a path that exists.
pub fn is_hub_id(s: &str) -> bool {
    let id = s.split_once('@').map_or(s, |(id, _)| id);
    let parts: Vec<&str> = id.split('/').collect();
    let name_ok = |p: &&str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.ends_with(".json")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (1..=2).contains(&parts.len()) && parts.iter().all(name_ok) && !Path::new(s).exists()
}

/// (repo id, revision) of "id" or "id@revision".
fn split_revision(s: &str) -> (String, String) {
    match s.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (s.to_string(), "main".to_string()),
    }
}

fn api() -> Result<Api> {
    ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| Error::Input(format!("cannot start the Hugging Face Hub client: {e}")))
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

fn is_missing(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _)))
}

/// The error for a failed fetch: what, from where, why, and what to do.
fn fetch_error(what: &str, id: &str, e: ApiError) -> Error {
    let hint = if is_missing(&e) {
        "the Hub has no such repository, revision or file (check the id and, for a dataset, --dataset)".to_string()
    } else {
        format!(
            "{e}. Check the network, or set HF_ENDPOINT to a mirror; files already in the Hugging Face cache \
             ({}) are used without the network",
            hf_hub::Cache::from_env().path().display()
        )
    };
    Error::Input(format!("cannot fetch {what} of {id} from {}: {hint}", endpoint()))
}

/// The snapshot directory of model `id` (with an optional "@revision") in the cache, holding its
/// config.json, weights and tokenizer files: each fetched unless already cached.
pub fn download_model(id: &str) -> Result<PathBuf> {
    let (repo_id, revision) = split_revision(id);
    let repo = api()?.repo(Repo::with_revision(repo_id.clone(), RepoType::Model, revision));
    let config = repo.get("config.json").map_err(|e| fetch_error("config.json", &repo_id, e))?;
    let dir = config.parent().expect("a cached file has a snapshot directory").to_path_buf();
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(e) if is_missing(&e) => {
            let index = repo
                .get("model.safetensors.index.json")
                .map_err(|e| fetch_error("model.safetensors or model.safetensors.index.json", &repo_id, e))?;
            for shard in shards(&index)? {
                repo.get(&shard).map_err(|e| fetch_error(&shard, &repo_id, e))?;
            }
        }
        Err(e) => return Err(fetch_error("model.safetensors", &repo_id, e)),
    }
    for f in MODEL_FILES {
        match repo.get(f) {
            Ok(_) => {}
            Err(e) if is_missing(&e) => {}
            Err(e) => return Err(fetch_error(f, &repo_id, e)),
        }
    }
    Ok(dir)
}

/// The shard files an index names.
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::read(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(index, format!("not valid JSON ({e})")))?;
    let map =
        v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::config(index, "no \"weight_map\""))?;
    let mut files: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The Parquet files of dataset `id` (with an optional "@revision"), fetched into the cache
/// unless there already: all of them, or those of `subset` (a path component, as the Hub lays out
/// a dataset's configs) and `split` (a path component or a file-name prefix: "train", "test").
pub fn download_dataset(id: &str, subset: Option<&str>, split: Option<&str>) -> Result<Vec<PathBuf>> {
    let (repo_id, revision) = split_revision(id);
    let repo = api()?.repo(Repo::with_revision(repo_id.clone(), RepoType::Dataset, revision));
    let names = list_files(&repo, &repo_id)?;
    let chosen: Vec<&String> = names.iter().filter(|n| n.ends_with(".parquet") && in_part(n, subset, split)).collect();
    if chosen.is_empty() {
        let parquet: Vec<&String> = names.iter().filter(|n| n.ends_with(".parquet")).take(8).collect();
        return Err(Error::Input(format!(
            "dataset {repo_id} has no Parquet files{}{}; its Parquet files include: {}",
            subset.map(|s| format!(" of subset {s}")).unwrap_or_default(),
            split.map(|s| format!(" in split {s}")).unwrap_or_default(),
            if parquet.is_empty() {
                "none".to_string()
            } else {
                parquet.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            }
        )));
    }
    chosen.iter().map(|f| repo.get(f).map_err(|e| fetch_error(f, &repo_id, e))).collect()
}

/// Whether a repository path belongs to `subset` and `split`.
fn in_part(path: &str, subset: Option<&str>, split: Option<&str>) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let (dirs, file) = parts.split_at(parts.len() - 1);
    let subset_ok = subset.is_none_or(|s| dirs.contains(&s));
    let split_ok = split.is_none_or(|s| {
        dirs.contains(&s) || file[0].starts_with(&format!("{s}-")) || file[0].starts_with(&format!("{s}."))
    });
    subset_ok && split_ok
}

/// The repository's file list: from the Hub, or, offline, from the cached snapshot.
fn list_files(repo: &ApiRepo, id: &str) -> Result<Vec<String>> {
    match repo.info() {
        Ok(info) => Ok(info.siblings.into_iter().map(|s| s.rfilename).collect()),
        Err(e) => {
            // offline: what a previous download left in the cache's snapshot of this revision
            let cache = hf_hub::Cache::from_env();
            let folder = cache.path().join(format!("datasets--{}", id.replace('/', "--")));
            let snapshot =
                std::fs::read_to_string(folder.join("refs/main")).ok().map(|r| folder.join("snapshots").join(r.trim()));
            match snapshot.filter(|s| s.is_dir()) {
                Some(dir) => {
                    let mut files = vec![];
                    collect(&dir, &dir, &mut files);
                    files.sort();
                    Ok(files)
                }
                None => Err(fetch_error("the file list", id, e)),
            }
        }
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// A `--data` input naming a Hub dataset, "org/name[@revision][:subset[/split]]" (e.g.
/// "Salesforce/wikitext:wikitext-2-raw-v1/train"; a bare name needs the ":subset"), as its
/// Parquet files; None for a path that exists, a glob, a file name, or anything else.
pub fn dataset_input(input: &str) -> Result<Option<Vec<PathBuf>>> {
    let (id, part) = match input.split_once(':') {
        Some((id, part)) => (id, Some(part)),
        None => (input, None),
    };
    // a bare name (or a file name with a text extension) is a missing file, not a dataset: Hub
    // datasets are "org/name" here, or any id with an explicit ":subset"
    let file_like = [".txt", ".jsonl", ".json", ".parquet", ".md", ".csv"].iter().any(|e| id.ends_with(e));
    if Path::new(input).exists()
        || input.contains(['*', '?', '['])
        || !is_hub_id(id)
        || file_like
        || (part.is_none() && !id.contains('/'))
    {
        return Ok(None);
    }
    let (subset, split) = match part.map(|p| p.split_once('/').map_or((p, None), |(a, b)| (a, Some(b)))) {
        Some((s, sp)) => (Some(s).filter(|s| !s.is_empty()), sp),
        None => (None, None),
    };
    eprintln!("{input} is not a local file: fetching the dataset from the Hugging Face Hub ({})", endpoint());
    download_dataset(id, subset, split).map(Some)
}

/// A `--model` argument as a local directory: the path itself when it exists, else the cached
/// (or freshly downloaded) snapshot of the Hub model it names.
pub fn local_model(arg: &Path) -> Result<PathBuf> {
    match arg.to_str() {
        Some(s) if !arg.exists() && is_hub_id(s) => {
            eprintln!("{s} is not a local directory: fetching it from the Hugging Face Hub ({})", endpoint());
            download_model(s).map_err(|e| {
                Error::Input(format!("{s} is neither a directory here nor a model kiln could fetch from the Hub: {e}"))
            })
        }
        _ => Ok(arg.to_path_buf()),
    }
}

//! `kiln download`: a model or a dataset from the Hugging Face Hub into the standard cache, as
//! `from_pretrained` and `load_dataset` fetch them (HF_HOME, HF_ENDPOINT).

use crate::io::hub;
use crate::Result;

#[derive(clap::Args)]
pub struct DownloadArgs {
    /// A Hub id: a model ("HuggingFaceTB/SmolLM2-135M", "gpt2") or, with --dataset, a dataset
    /// ("Salesforce/wikitext"); "id@revision" picks a branch, tag or commit.
    pub id: String,
    /// The id names a dataset: fetch its Parquet files.
    #[arg(long)]
    pub dataset: bool,
    /// A dataset's subset (its config), e.g. wikitext-2-raw-v1.
    #[arg(long, requires = "dataset")]
    pub subset: Option<String>,
    /// A dataset's split: train, validation, test.
    #[arg(long, requires = "dataset")]
    pub split: Option<String>,
}

pub fn run(args: DownloadArgs) -> Result<()> {
    if args.dataset {
        let files = hub::download_dataset(&args.id, args.subset.as_deref(), args.split.as_deref())?;
        let bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
        println!(
            "dataset {}: {} Parquet files, {:.1} MB, in the Hugging Face cache:",
            args.id,
            files.len(),
            bytes as f64 / 1e6
        );
        for f in &files {
            println!("  {}", f.display());
        }
        let part = match (&args.subset, &args.split) {
            (Some(s), Some(sp)) => format!(":{s}/{sp}"),
            (Some(s), None) => format!(":{s}"),
            (None, Some(sp)) => format!(":/{sp}"),
            (None, None) => String::new(),
        };
        println!("train on its \"text\" column: kiln pretrain --data {}{part} --out runs/pt", args.id);
    } else {
        let dir = hub::download_model(&args.id)?;
        let config = crate::model::Config::from_json_file(&dir.join("config.json"))?;
        println!(
            "model {}: a {} of {:.1}M parameters, in the Hugging Face cache at {}",
            args.id,
            config.family(),
            config.num_params() as f64 / 1e6,
            dir.display()
        );
        println!("use it by id or by path: kiln generate --model {} --prompt \"Hello\"", args.id);
    }
    Ok(())
}

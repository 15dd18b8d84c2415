//! Through the `kiln` binary: exit code 1 and one `error:` line naming the file.

use super::*;

pub fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("the kiln binary runs")
}

/// Checks a failed run: exit code 1, no panic, exactly one `error:` line, and it names `file`.
pub fn one_error_line(o: &std::process::Output, file: &str, args: &[&str]) -> Result<(), TestCaseError> {
    let err = String::from_utf8_lossy(&o.stderr);
    prop_assert!(!err.contains("panicked"), "kiln {args:?} panicked:\n{err}");
    prop_assert_eq!(o.status.code(), Some(1), "kiln {:?} should exit with 1:\n{}", args, err);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    prop_assert_eq!(lines.len(), 1, "kiln {:?} should print one error line:\n{}", args, err);
    prop_assert!(lines[0].contains(file), "the error of kiln {args:?} does not name {file}:\n{err}");
    Ok(())
}

/// Either a success or a clean failure naming `file`.
pub fn ok_or_one_error(o: &std::process::Output, file: &str, args: &[&str]) -> Result<(), TestCaseError> {
    if o.status.success() {
        return Ok(());
    }
    one_error_line(o, file, args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn binary_eval_on_corrupt_checkpoints_and_batches() {
    let _serial = serial();
    let s_ = seeds();
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.safetensors");
    std::fs::write(&batch, batch_seed_i64()).unwrap();
    // the plain cases: a truncated checkpoint, a batch with a broken header
    let model = case_dir(Some(&s_.model_f32));
    let weights = model.path().join("model.safetensors");
    let full = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &full[..full.len() / 2]).unwrap();
    let args = ["eval", "--model", s(model.path()), "--batch", s(&batch)];
    one_error_line(&kiln(&args), "model.safetensors", &args).unwrap();
    let bad_batch = dir.path().join("bad-batch.safetensors");
    let mut b = batch_seed_i64();
    b[0] ^= 0x40;
    std::fs::write(&bad_batch, &b).unwrap();
    let args = ["eval", "--model", s(&s_.model_f32), "--batch", s(&bad_batch)];
    one_error_line(&kiln(&args), "bad-batch.safetensors", &args).unwrap();
    // and mutations of either
    fuzz("kiln eval", cases(160) / 8, (any::<bool>(), st_edits()), |(on_model, edits)| {
        let model = case_dir(Some(&s_.model_f32));
        let case_batch = model.path().join("case-batch.safetensors");
        let (target, seed) = if on_model {
            (model.path().join("model.safetensors"), std::fs::read(s_.model_f32.join("model.safetensors")).unwrap())
        } else {
            (case_batch.clone(), batch_seed_i64())
        };
        std::fs::write(&case_batch, batch_seed_i64()).unwrap();
        let mut data = seed;
        edits.iter().for_each(|e| apply_st(&mut data, e));
        std::fs::write(&target, data).unwrap();
        let args = ["eval", "--model", s(model.path()), "--batch", s(&case_batch)];
        let o = kiln(&args);
        ok_or_one_error(&o, target.file_name().unwrap().to_str().unwrap(), &args)
    });
}

#[test]
fn binary_generate_prompt_ids() {
    let _serial = serial();
    let s_ = seeds();
    let model = s(&s_.model_f32).to_string();
    let fixed = ["", ",", "1,x", "-1", "99999999999", "1;2", "0x10", "1e3", "1,,2,", "400", "٣"];
    let picked = prop_oneof![
        (0..fixed.len()).prop_map(move |i| fixed[i].to_string()),
        prop::collection::vec(prop_oneof![Just('1'), Just(','), Just(' '), Just('-'), any::<char>()], 0..12)
            .prop_map(|c| c.into_iter().filter(|&c| c != '\0').collect::<String>()),
        (1..40usize).prop_map(|n| vec!["5"; n].join(",")),
    ];
    for bad in ["", "1,x", "-1", "99999999999", "400", &vec!["5"; 40].join(",")] {
        let ids = format!("--prompt-ids={bad}");
        let args = ["generate", "--model", &model, &ids, "--max-new-tokens", "2"];
        one_error_line(&kiln(&args), "prompt", &args).unwrap();
    }
    let args = ["generate", "--model", &model, "--prompt-ids=1,99999999999"];
    let o = kiln(&args);
    assert!(String::from_utf8_lossy(&o.stderr).contains("'99999999999' is larger than any token id"), "{o:?}");
    fuzz("kiln generate --prompt-ids", cases(160) / 8, picked, |ids| {
        let ids = format!("--prompt-ids={ids}");
        let args = ["generate", "--model", &model, &ids, "--max-new-tokens", "2"];
        ok_or_one_error(&kiln(&args), "prompt", &args)
    });
}

#[test]
fn binary_pretrain_resume_on_corrupt_token_file() {
    let _serial = serial();
    let s_ = seeds();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let sets = [
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        "model.n_positions=16",
        "data.tokenizer_vocab_size=300",
        "train.batch_size=2",
        "train.seq_len=8",
        "train.eval_windows=2",
        "train.save_every=1",
        "train.warmup_steps=0",
    ];
    let mut args = vec!["pretrain", "--out", s(&run), "--data", s(&s_.text), "--max-steps", "1"];
    sets.iter().for_each(|kv| args.extend(["--set", kv]));
    let o = kiln(&args);
    assert!(o.status.success(), "the seed run failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let tok = run.join("data").join("train.tok");
    let good = std::fs::read(&tok).unwrap();
    args.retain(|a| *a != "1" && *a != "--max-steps");
    args.extend(["--resume", "--max-steps", "2"]);
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: [(&str, Damage); 4] = [
        ("truncated", Box::new(|d: &mut Vec<u8>| d.truncate(d.len() - 3))),
        ("bad magic", Box::new(|d: &mut Vec<u8>| d[0] = b'X')),
        ("huge count", Box::new(|d: &mut Vec<u8>| d[16..24].copy_from_slice(&u64::MAX.to_le_bytes()))),
        ("id past its vocabulary", Box::new(|d: &mut Vec<u8>| d[40..42].copy_from_slice(&[0xff, 0xff]))),
    ];
    for (what, corrupt) in cases {
        let mut data = good.clone();
        corrupt(&mut data);
        std::fs::write(&tok, &data).unwrap();
        one_error_line(&kiln(&args), "train.tok", &args).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn binary_finetune_on_corrupt_sft_files() {
    let _serial = serial();
    let s_ = seeds();
    let dir = tempfile::tempdir().unwrap();
    let model = s(&s_.model_f32).to_string();
    let (name, good) = &sft_seeds()[0];
    let bad: [(&str, Vec<u8>); 4] = [
        ("not UTF-8", [good.as_bytes(), b"\xff\xfe\n"].concat()),
        ("a cut line", good.as_bytes()[..good.len() - 9].to_vec()),
        ("empty", vec![]),
        ("a number for a prompt", good.replacen("\"the kiln 0?\"", "1e999", 1).into_bytes()),
    ];
    for (i, (what, data)) in bad.iter().enumerate() {
        let path = dir.path().join(format!("{i}-{name}"));
        std::fs::write(&path, data).unwrap();
        let out = dir.path().join(format!("out-{i}"));
        let args = ["finetune", "--model", &model, "--data", s(&path), "--out", s(&out), "--max-steps", "1"];
        one_error_line(&kiln(&args), path.file_name().unwrap().to_str().unwrap(), &args)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

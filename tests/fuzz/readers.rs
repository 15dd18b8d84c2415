//! The library's readers, each fed mutations of its seed files.

use super::*;

#[test]
fn fuzz_safetensors_reader() {
    let _serial = serial();
    let s = seeds();
    let files = [
        s.model_f32.join("model.safetensors"),
        s.model_bf16.join("model.safetensors"),
        s.adapter.join(peft::WEIGHTS_FILE),
    ];
    fuzz("safetensors", cases(160), (0..3usize, st_edits()), |(which, edits)| {
        let dir = case_dir(None);
        let path = dir.path().join("weights.safetensors");
        let n = put(&path, &mutated_st(&files[which], &edits));
        check(&path, n, || checkpoint::load_all(&path))?;
        Ok(())
    });
}

#[test]
fn fuzz_checkpoint_weights() {
    let _serial = serial();
    let s = seeds();
    fuzz("checkpoint-weights", cases(160), (any::<bool>(), st_edits()), |(bf16, edits)| {
        let dir = case_dir(Some(if bf16 { &s.model_bf16 } else { &s.model_f32 }));
        let path = dir.path().join("model.safetensors");
        let n = put(&path, &mutated_st(&path, &edits));
        if let Some(model) = check(&path, n, || checkpoint::load_model(dir.path()))? {
            prop_assert!(finite_params(&model), "a checkpoint with non-finite weights loaded");
            downstream("a forward pass", || forward(&model))?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_nf4_checkpoint() {
    let _serial = serial();
    let s = seeds();
    fuzz("nf4-checkpoint", cases(160), (any::<bool>(), st_edits()), |(as_qlora_base, edits)| {
        let dir = case_dir(Some(&s.model_nf4));
        let path = dir.path().join("model.safetensors");
        let n = put(&path, &mutated_st(&path, &edits));
        let load = || match as_qlora_base {
            true => checkpoint::load_nf4_base(dir.path()),
            false => checkpoint::load_model(dir.path()),
        };
        if let Some(model) = check(&path, n, load)? {
            prop_assert!(finite_params(&model), "an NF4 checkpoint with non-finite values loaded");
            downstream("a forward pass", || forward(&model))?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_checkpoint_config() {
    let _serial = serial();
    let s = seeds();
    let seed = std::fs::read(s.model_f32.join("config.json")).unwrap();
    fuzz("config.json", cases(160), json_file_edits(), |edits| {
        let dir = case_dir(Some(&s.model_f32));
        let path = dir.path().join("config.json");
        let n = put(&path, &apply_json_file(&seed, &edits));
        let loaded = check(&path, n, || checkpoint::load_model(dir.path()))?;
        if let Some(model) = loaded {
            let c = &model.config;
            let floats = match c {
                kiln::Config::Gpt2(c) => {
                    vec![c.layer_norm_epsilon, c.embd_pdrop, c.resid_pdrop, c.attn_pdrop, c.initializer_range]
                }
                kiln::Config::Llama(c) => vec![c.rms_norm_eps, c.rope_theta, c.initializer_range],
            };
            prop_assert!(floats.iter().all(|f| f.is_finite()), "a config with non-finite values loaded: {c:?}");
            downstream("a forward pass", || forward(&model))?;
        }
        let direct = check(&path, n, || Gpt2Config::from_json_file(&path))?;
        if let Some(c) = direct {
            prop_assert!(c.layer_norm_epsilon.is_finite(), "layer_norm_epsilon {} loaded", c.layer_norm_epsilon);
        }
        Ok(())
    });
}

#[test]
fn fuzz_peft_adapter() {
    let _serial = serial();
    let s = seeds();
    let base = checkpoint::load_model(&s.model_f32).unwrap();
    let config_seed = std::fs::read(s.adapter.join(peft::CONFIG_FILE)).unwrap();
    let edits = prop_oneof![json_file_edits().prop_map(|e| (Some(e), vec![])), st_edits().prop_map(|e| (None, e)),];
    fuzz("peft-adapter", cases(160), edits, |(config_edits, st)| {
        let dir = case_dir(Some(&s.adapter));
        let (cpath, wpath) = (dir.path().join(peft::CONFIG_FILE), dir.path().join(peft::WEIGHTS_FILE));
        let n = match &config_edits {
            Some(e) => put(&cpath, &apply_json_file(&config_seed, e)),
            None => put(&wpath, &mutated_st(&wpath, &st)),
        };
        let named = if config_edits.is_some() { &cpath } else { &wpath };
        let mut model = base.clone();
        // a config and weights that do not fit each other may be named through either file
        let loaded = check(named, n, || {
            peft::load_adapter(&mut model, dir.path()).map_err(|e| {
                let m = e.to_string();
                let other = if config_edits.is_some() { peft::WEIGHTS_FILE } else { peft::CONFIG_FILE };
                if m.contains(other) {
                    kiln::Error::Input(format!("{}: {m}", named.display()))
                } else {
                    e
                }
            })
        })?;
        if loaded.is_some() {
            prop_assert!(finite_params(&model), "an adapter with non-finite weights loaded");
            downstream("a forward pass with the adapter", || forward(&model))?;
        }
        Ok(())
    });
}

/// Encodes and decodes a little text with a tokenizer that loaded.
fn use_tokenizer(tok: &Tokenizer) -> kiln::Result<()> {
    let ids = tok.encode("the kiln fires clay, é ✓ <|endoftext|>\n")?;
    tok.decode(&ids)?;
    let _ = (tok.vocab_size(), tok.id_bound(), tok.eos_id());
    Ok(())
}

#[test]
fn fuzz_tokenizer_json() {
    let _serial = serial();
    let s = seeds();
    let seed = std::fs::read(&s.tokenizer).unwrap();
    fuzz("tokenizer.json", cases(96), json_file_edits(), |edits| {
        let dir = case_dir(None);
        let path = dir.path().join("tokenizer.json");
        let n = put(&path, &apply_json_file(&seed, &edits));
        if let Some(tok) = check(&path, n, || Tokenizer::load(&path))? {
            downstream("encoding", || use_tokenizer(&tok))?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_tokenizer_vocab_merges() {
    let _serial = serial();
    let s = seeds();
    let edits = prop_oneof![json_file_edits().prop_map(|e| (Some(e), vec![])), text_edits().prop_map(|e| (None, e)),];
    fuzz("vocab+merges", cases(96), (any::<bool>(), edits), |(openai_names, (vocab_edits, merges_edits))| {
        let dir = case_dir(None);
        let (vname, mname) = if openai_names { ("encoder.json", "vocab.bpe") } else { ("vocab.json", "merges.txt") };
        let (vpath, mpath) = (dir.path().join(vname), dir.path().join(mname));
        let mut merges = s.merges_txt.clone();
        merges_edits.iter().for_each(|e| apply_text(&mut merges, e, false));
        let vocab = match &vocab_edits {
            Some(e) => apply_json_file(&s.vocab_json, e),
            None => s.vocab_json.clone(),
        };
        let n = put(&vpath, &vocab) + put(&mpath, &merges);
        let named = if vocab_edits.is_some() { &vpath } else { &mpath };
        // a vocabulary and merges that do not fit each other are named through either file
        let other = if vocab_edits.is_some() { mname } else { vname };
        let loaded = check(named, n, || {
            Tokenizer::load(dir.path()).map_err(|e| match e.to_string() {
                m if m.contains(other) => kiln::Error::Input(format!("{}: {m}", named.display())),
                _ => e,
            })
        })?;
        if let Some(tok) = loaded {
            downstream("encoding", || use_tokenizer(&tok))?;
        }
        Ok(())
    });
}

/// A change to a token file: a header field (version, width, count, vocabulary) or a token id.
#[derive(Clone, Debug)]
enum TokEdit {
    Field(u8, u64),
    Id(Index, u32),
    Bytes(ByteEdit),
}

#[test]
fn fuzz_token_file() {
    let _serial = serial();
    let s = seeds();
    let seed = std::fs::read(&s.token_file).unwrap();
    let edit = prop_oneof![
        2 => (0..4u8, huge()).prop_map(|(f, v)| TokEdit::Field(f, v)),
        2 => (any::<Index>(), prop_oneof![Just(u32::MAX), Just(65535), Just(300), any::<u32>()])
            .prop_map(|(i, v)| TokEdit::Id(i, v)),
        3 => byte_edit().prop_map(TokEdit::Bytes),
    ];
    fuzz("token-file", cases(160), prop::collection::vec(edit, 1..4), |edits| {
        let mut data = seed.clone();
        for e in &edits {
            match e {
                TokEdit::Field(f, v) if data.len() >= 32 => match f {
                    0 | 1 => data[8 + 4 * *f as usize..][..4].copy_from_slice(&(*v as u32).to_le_bytes()),
                    _ => data[16 + 8 * (*f as usize - 2)..][..8].copy_from_slice(&v.to_le_bytes()),
                },
                TokEdit::Id(i, v) if data.len() > 36 => {
                    let width = if data[12] == 4 { 4 } else { 2 };
                    let k = 32 + i.index((data.len() - 32) / width) * width;
                    data[k..k + width].copy_from_slice(&v.to_le_bytes()[..width]);
                }
                TokEdit::Bytes(b) => apply_bytes(&mut data, b),
                _ => {}
            }
        }
        let dir = case_dir(None);
        let path = dir.path().join("train.tok");
        let n = put(&path, &data);
        if let Some(tf) = check(&path, n, || TokenFile::open(&path))? {
            let ids = tf.tokens(0..tf.len());
            prop_assert!(
                ids.iter().all(|&id| (id as usize) < tf.vocab_size()),
                "a token file holding ids outside its vocabulary of {} loaded",
                tf.vocab_size()
            );
            downstream("check_vocab", || check_vocab(&tf, 300))?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_sft_records() {
    let _serial = serial();
    let s = seeds();
    let tok = Tokenizer::load(&s.tokenizer).unwrap();
    let seeds = sft_seeds();
    let n_seeds = seeds.len();
    fuzz("sft", cases(160), (0..n_seeds, json_file_edits(), any::<bool>()), |(which, edits, pack)| {
        let (name, text) = &seeds[which];
        let data = if name.ends_with(".jsonl") {
            // JSON lines: each line is its own JSON document, so edit the text
            let mut d = text.clone().into_bytes();
            edits.iter().filter_map(|e| if let JsonFileEdit::Text(t) = e { Some(t) } else { None }).for_each(|t| {
                apply_text(&mut d, t, false);
            });
            d
        } else {
            apply_json_file(text.as_bytes(), &edits)
        };
        let dir = case_dir(None);
        let path = dir.path().join(name);
        let n = put(&path, &data);
        if let Some(ex) = check(&path, n, || sft::load_examples(&path, Format::Auto, &ChatTemplate::default()))? {
            downstream("tokenizing the examples", || sft::tokenize(&ex, &tok, 32, tok.eos_id(), pack))?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_batch_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let i32_seed = dir.path().join("i32.safetensors");
    let ids = Tensor::from_i32((0..24).collect(), [3, 8]).unwrap();
    kst::save(&i32_seed, &[("input_ids".into(), ids)], &[]).unwrap();
    let seeds = [batch_seed_i64(), std::fs::read(&i32_seed).unwrap()];
    let config = tiny_config();
    fuzz("batch", cases(160), (any::<bool>(), st_edits()), |(which, edits)| {
        let mut data = seeds[which as usize].clone();
        edits.iter().for_each(|e| apply_st(&mut data, e));
        let dir = case_dir(None);
        let path = dir.path().join("batch.safetensors");
        let n = put(&path, &data);
        if let Some(b) = check(&path, n, || Batch::load(&path))? {
            downstream("validating the batch", || b.validate(config.vocab_size, config.n_positions))?;
            downstream("building targets", || b.targets())?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_run_toml() {
    let _serial = serial();
    let seed = run_toml_seed();
    fuzz("run.toml", cases(160), text_edits(), |edits| {
        let mut data = seed.clone().into_bytes();
        edits.iter().for_each(|e| apply_text(&mut data, e, true));
        let dir = case_dir(None);
        let path = dir.path().join("run.toml");
        let n = put(&path, &data);
        if let Some(cfg) = check(&path, n, || RunConfig::load(Some(&path), &[]))? {
            let tree = toml::Value::try_from(&cfg).expect("a run config serialises");
            prop_assert!(all_finite(&tree), "a run config with a non-finite value loaded:\n{}", cfg.to_toml());
        }
        Ok(())
    });
}

#[test]
fn fuzz_run_overrides() {
    let _serial = serial();
    let keys = prop_oneof![
        Just("train.lr"),
        Just("train.seq_len"),
        Just("model.dropout"),
        Just("data.train"),
        Just("finetune.chat"),
        Just("train"),
        Just("x.y.z"),
        Just(""),
    ];
    let value = prop_oneof![
        (0..TOML_VALUES.len()).prop_map(|i| TOML_VALUES[i].to_string()),
        prop::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect::<String>()),
    ];
    let one = (keys, prop_oneof![Just("="), Just(""), Just("==")], value).prop_map(|(k, e, v)| format!("{k}{e}{v}"));
    fuzz("--set", cases(160), prop::collection::vec(one, 1..4), |overrides| {
        match catch_unwind(|| RunConfig::load(None, &overrides)) {
            Err(p) => Err(TestCaseError::fail(format!("--set {overrides:?} panicked: {}", panic_text(&p)))),
            Ok(Ok(cfg)) => {
                let tree = toml::Value::try_from(&cfg).expect("a run config serialises");
                prop_assert!(all_finite(&tree), "--set {overrides:?} gave a non-finite value");
                Ok(())
            }
            Ok(Err(_)) => Ok(()),
        }
    });
}

#[test]
fn fuzz_quantize_input() {
    let _serial = serial();
    let s = seeds();
    let input = s.model_f32.join("model.safetensors");
    let opts = kiln::io::nf4::Nf4FileOptions { double_quant: true, ..Default::default() };
    fuzz("quantize", cases(64), st_edits(), |edits| {
        let dir = case_dir(None);
        let (path, out) = (dir.path().join("model.safetensors"), dir.path().join("nf4.safetensors"));
        let n = put(&path, &mutated_st(&input, &edits));
        let written = check(&path, n, || kiln::io::nf4::quantize_file_nf4(&path, &out, &opts))?;
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        match written {
            None => prop_assert!(left.len() == 1, "a failed quantize left files behind: {left:?}"),
            Some(_) => {
                prop_assert!(left.len() == 2, "quantize left files behind: {left:?}");
                prop_assert!(checkpoint::load_all(&out).is_ok(), "quantize wrote a file kiln cannot read");
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_corpus_files() {
    let _serial = serial();
    let s = seeds();
    let tok = Tokenizer::load(&s.tokenizer).unwrap();
    let text = corpus_text(200);
    let docs: Vec<Value> = text.split("\n\n").map(|d| serde_json::json!({ "text": d })).collect();
    let seeds = [
        ("corpus.txt", text.clone().into_bytes()),
        ("corpus.jsonl", docs.iter().map(|d| format!("{d}\n")).collect::<String>().into_bytes()),
        ("corpus.json", serde_json::to_vec_pretty(&docs).unwrap()),
    ];
    fuzz("corpus", cases(64), (0..seeds.len(), text_edits()), |(which, edits)| {
        let (name, seed) = &seeds[which];
        let mut data = seed.clone();
        edits.iter().for_each(|e| apply_text(&mut data, e, false));
        let dir = case_dir(None);
        let (path, out) = (dir.path().join(name), dir.path().join("train.tok"));
        let n = put(&path, &data);
        let built = check(&path, n, || build_token_file(std::slice::from_ref(&path), &tok, &out, false))?;
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        // a failed build leaves nothing behind: no token file, no temporary one
        prop_assert_eq!(left, if built.is_some() { 2 } else { 1 }, "files left in {:?}", dir.path());
        Ok(())
    });
}

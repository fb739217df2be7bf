//! Tokenizer, chat template and detokenizer parity with Hugging Face transformers, on the
//! reference data in `tests/fixtures/*/reference.{json,safetensors}`.

use std::path::{Path, PathBuf};

use mixserve::text::{ChatMessage, ChatTemplate, IncrementalDetokenizer, TemplateError, Tokenizer};
use serde::Deserialize;

const FIXTURES: [&str; 2] = ["tiny-mixtral", "tiny-dbrx"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load_tokenizer(model: &str) -> Tokenizer {
    let dir = root().join("models").join(model);
    Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        Some(&dir.join("generation_config.json")),
    )
    .unwrap()
}

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
    chat: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct Prompt {
    index: usize,
    text: String,
    greedy_text: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    prompt_text: String,
    prompt_ids: Vec<u32>,
}

fn reference(model: &str) -> Reference {
    let path = root()
        .join("tests/fixtures")
        .join(model)
        .join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An i64 tensor of `reference.safetensors` as token ids.
fn reference_ids(model: &str, name: &str) -> Vec<u32> {
    let path = root()
        .join("tests/fixtures")
        .join(model)
        .join("reference.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    view.data()
        .chunks_exact(8)
        .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
        .collect()
}

/// The text `gen` adds after `prompt`: `decode(prompt + gen)` minus the `decode(prompt)` prefix.
fn generated_text(tok: &Tokenizer, prompt: &[u32], gen: &[u32], skip: bool) -> String {
    let before = tok.decode(prompt, skip).unwrap();
    let all: Vec<u32> = prompt.iter().chain(gen).copied().collect();
    let after = tok.decode(&all, skip).unwrap();
    after
        .strip_prefix(&before)
        .unwrap_or_else(|| panic!("{before:?} is not a prefix of {after:?}"))
        .to_string()
}

/// Streams `gen` and checks the invariant: the deltas (plus flush) are exactly the generated
/// text, and no delta has a U+FFFD where the final text has none. Returns the deltas.
fn check_stream(tok: &Tokenizer, prompt: &[u32], gen: &[u32], skip: bool) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new(tok.clone(), prompt, skip);
    let mut deltas: Vec<String> = gen.iter().map(|&id| detok.push(id).unwrap()).collect();
    deltas.push(detok.flush().unwrap());
    let expected = generated_text(tok, prompt, gen, skip);
    let streamed = deltas.concat();
    assert_eq!(streamed, expected, "prompt {prompt:?} gen {gen:?}");
    let mut offset = 0;
    for delta in &deltas {
        for (i, c) in delta.char_indices() {
            if c == '\u{FFFD}' {
                assert_eq!(expected[offset + i..].chars().next(), Some('\u{FFFD}'));
            }
        }
        offset += delta.len();
    }
    deltas
}

#[test]
fn chat_cases_render_and_encode_like_transformers() {
    for model in FIXTURES {
        let tok = load_tokenizer(model);
        let template = tok.chat_template().expect("fixture has a chat template");
        let reference = reference(model);
        assert!(!reference.chat.is_empty());
        for case in &reference.chat {
            let text = template.render(&case.messages, true).unwrap();
            assert_eq!(text, case.prompt_text, "{model}");
            assert_eq!(
                tok.encode(&text, false).unwrap(),
                case.prompt_ids,
                "{model}"
            );
        }
    }
}

#[test]
fn mixtral_template_errors_are_raised_verbatim() {
    let tok = load_tokenizer("tiny-mixtral");
    let template = tok.chat_template().unwrap();
    let two_users = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("user", "Hi again"),
    ];
    match template.render(&two_users, true) {
        Err(TemplateError::Raised(msg)) => assert_eq!(
            msg,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected a raised exception, got {other:?}"),
    }
    let system = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    match template.render(&system, true) {
        Err(err @ TemplateError::Raised(_)) => {
            // The message goes to the client as is.
            assert_eq!(
                err.to_string(),
                "Conversation roles must alternate user/assistant/user/assistant/..."
            );
        }
        other => panic!("expected a raised exception, got {other:?}"),
    }
    // A system message in second position gets past the alternation check.
    let late_system = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("system", "Be brief."),
    ];
    match template.render(&late_system, true) {
        Err(TemplateError::Raised(msg)) => {
            assert_eq!(msg, "Only user and assistant roles are supported!")
        }
        other => panic!("expected a raised exception, got {other:?}"),
    }
}

#[test]
fn prompts_encode_like_transformers() {
    for model in FIXTURES {
        let tok = load_tokenizer(model);
        let reference = reference(model);
        assert_eq!(reference.prompts.len(), 5);
        for prompt in &reference.prompts {
            let expected = reference_ids(model, &format!("p{}.input_ids", prompt.index));
            let ids = tok.encode(&prompt.text, true).unwrap();
            assert_eq!(ids, expected, "{model} prompt {}", prompt.index);
            assert_eq!(ids[0], 1, "exactly one BOS");
            assert_ne!(ids[1], 1);
            // Round trip: the BOS is dropped and the sentencepiece leading space stripped.
            assert_eq!(tok.decode(&ids, true).unwrap(), prompt.text);
        }
    }
}

#[test]
fn greedy_tokens_stream_to_the_full_decode() {
    for model in FIXTURES {
        let tok = load_tokenizer(model);
        for prompt in &reference(model).prompts {
            let prompt_ids = reference_ids(model, &format!("p{}.input_ids", prompt.index));
            let greedy = reference_ids(model, &format!("p{}.greedy", prompt.index));
            assert_eq!(greedy.len(), 24);
            for skip in [true, false] {
                check_stream(&tok, &prompt_ids, &greedy, skip);
            }
            // transformers decoded the generated ids on their own, which drops the leading
            // space of the first token; otherwise it is the same text.
            let text = generated_text(&tok, &prompt_ids, &greedy, true);
            let standalone = text.strip_prefix(' ').unwrap_or(&text);
            assert_eq!(
                standalone, prompt.greedy_text,
                "{model} prompt {}",
                prompt.index
            );
            assert_eq!(tok.decode(&greedy, true).unwrap(), prompt.greedy_text);
        }
    }
}

#[test]
fn greedy_output_with_a_lone_byte_token_keeps_its_replacement_character() {
    // tiny-mixtral's third greedy continuation has an invalid byte-fallback token; the stream
    // must show U+FFFD there (as the full decode does) and nowhere else.
    let tok = load_tokenizer("tiny-mixtral");
    let prompt_ids = reference_ids("tiny-mixtral", "p2.input_ids");
    let greedy = reference_ids("tiny-mixtral", "p2.greedy");
    let deltas = check_stream(&tok, &prompt_ids, &greedy, true);
    let with_fffd: Vec<&String> = deltas.iter().filter(|d| d.contains('\u{FFFD}')).collect();
    assert_eq!(with_fffd.len(), 1, "{deltas:?}");
    assert_eq!(deltas.concat().matches('\u{FFFD}').count(), 1);
}

#[test]
fn cjk_and_emoji_stream_exactly() {
    let text = "日本語のテキスト 🎉👩‍💻 ok";
    for model in FIXTURES {
        let tok = load_tokenizer(model);
        let ids = tok.encode(text, false).unwrap();
        assert!(
            ids.iter().any(|&id| tok.is_byte_fallback(id)),
            "emoji use byte fallback"
        );
        let prompt = tok.encode("Write:", true).unwrap();
        let deltas = check_stream(&tok, &prompt, &ids, true);
        assert_eq!(deltas.concat(), format!(" {text}"));
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        // Without a prompt the decoder strips the sentencepiece space, like decode().
        let deltas = check_stream(&tok, &[], &ids, true);
        assert_eq!(deltas.concat(), text);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    }
}

/// Deterministic xorshift, so that the property test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u32 {
        (self.next() % n) as u32
    }
}

#[test]
fn random_token_streams_match_the_full_decode() {
    // Mostly byte-fallback tokens (ids 3..=258), so that valid, truncated and invalid UTF-8
    // runs all occur, mixed with ordinary pieces, spaces and special tokens.
    let tok = load_tokenizer("tiny-mixtral");
    let vocab = tok.vocab_size() as u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let utf8_leads = [0xC3u8, 0xE6, 0xF0];
    for case in 0..400 {
        let prompt_len = rng.below(8);
        let mut prompt: Vec<u32> = (0..prompt_len)
            .map(|_| 259 + rng.below(vocab - 259))
            .collect();
        if case % 5 == 0 {
            prompt.insert(0, 1);
        }
        let mut gen = Vec::new();
        while gen.len() < 24 {
            match rng.below(10) {
                0..=3 => {
                    // A (usually well-formed) UTF-8 sequence in byte tokens.
                    let lead = utf8_leads[rng.below(3) as usize];
                    let len = match lead {
                        0xC3 => 2,
                        0xE6 => 3,
                        _ => 4,
                    };
                    let len = if rng.below(4) == 0 {
                        u64::from(rng.below(len)) + 1
                    } else {
                        len
                    };
                    gen.push(3 + u32::from(lead));
                    for _ in 1..len {
                        let cont = if lead == 0xF0 {
                            0x9F
                        } else {
                            0x80 + rng.below(0x40)
                        };
                        gen.push(3 + cont);
                    }
                }
                4 => gen.push(3 + rng.below(256)),
                5 => gen.push(rng.below(3)),
                6 => gen.push(28705), // "▁"
                _ => gen.push(259 + rng.below(vocab - 259)),
            }
        }
        for skip in [true, false] {
            check_stream(&tok, &prompt, &gen, skip);
        }
    }
}

#[test]
fn special_token_ids() {
    for model in FIXTURES {
        let tok = load_tokenizer(model);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.eos_token(), Some("</s>"));
        assert_eq!(tok.vocab_size(), 32000);
        assert_eq!(tok.token_to_id("</s>"), Some(2));
        assert_eq!(tok.id_to_token(1).as_deref(), Some("<s>"));
        assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
        assert!(!tok.is_special(3) && !tok.is_special(28705));
        assert_eq!(tok.inner().get_vocab_size(true), 32000);
    }
}

/// Writes `files` into a fresh directory next to a copy of the fixture's tokenizer.json.
fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root().join("models/tiny-mixtral/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    dir
}

fn load_dir(dir: &Path) -> Tokenizer {
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
    let (cfg, gen) = (opt("tokenizer_config.json"), opt("generation_config.json"));
    Tokenizer::from_files(&dir.join("tokenizer.json"), cfg.as_deref(), gen.as_deref()).unwrap()
}

#[test]
fn config_variants() {
    // AddedToken objects, an eos list, named templates, and add_bos_token: false.
    let dir = model_dir(&[
        (
            "tokenizer_config.json",
            r#"{"bos_token": {"content": "<s>", "special": true},
                "eos_token": {"content": "</s>"},
                "add_bos_token": false,
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]}"#,
        ),
        (
            "generation_config.json",
            r#"{"eos_token_id": [32001, 2, 32001]}"#,
        ),
    ]);
    let tok = load_dir(dir.path());
    assert_eq!(tok.eos_token_ids(), &[32001, 2]);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(
        tok.encode("Hi", true).unwrap(),
        tok.encode("Hi", false).unwrap()
    );
    assert_eq!(
        tok.chat_template().unwrap().render(&[], false).unwrap(),
        "<s>D</s>"
    );

    // No configs at all: the tokenizer still works, without special-token knowledge.
    let dir = model_dir(&[]);
    let tok = load_dir(dir.path());
    assert_eq!(tok.eos_token_ids(), &[] as &[u32]);
    assert!(tok.chat_template().is_none());
    assert_eq!(
        tok.encode("Hi", true).unwrap()[0],
        1,
        "post-processor adds BOS"
    );

    // generation_config alone names the tokens; a chat_template.jinja beside the config.
    let dir = model_dir(&[
        (
            "generation_config.json",
            r#"{"bos_token_id": 1, "eos_token_id": 2}"#,
        ),
        ("tokenizer_config.json", r#"{"add_eos_token": true}"#),
        (
            "chat_template.jinja",
            "{{ bos_token }}[{{ messages[0].content }}]\n",
        ),
    ]);
    let tok = load_dir(dir.path());
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<s>"), Some("</s>"))
    );
    assert_eq!(tok.eos_token_ids(), &[2]);
    let ids = tok.encode("Hi", true).unwrap();
    assert_eq!((ids[0], ids[ids.len() - 1]), (1, 2));
    let rendered = tok
        .chat_template()
        .unwrap()
        .render(&[ChatMessage::new("user", "x")], true)
        .unwrap();
    assert_eq!(
        rendered, "<s>[x]",
        "single trailing newline dropped as in Jinja2"
    );

    // A template that does not compile is dropped with a warning, not a load failure.
    let dir = model_dir(&[("tokenizer_config.json", r#"{"chat_template": "{% if %}"}"#)]);
    assert!(load_dir(dir.path()).chat_template().is_none());
}

#[test]
fn chat_template_from_file() {
    let dir = model_dir(&[
        (
            "t.jinja",
            "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}{% endfor %}",
        ),
        ("t.json", r#"{"chat_template": "{{ eos_token }}"}"#),
        ("bad.json", r#"{"other": 1}"#),
    ]);
    let msgs = [ChatMessage::new("user", " hi ")];
    let t = ChatTemplate::from_file(&dir.path().join("t.jinja"), None, None).unwrap();
    assert_eq!(t.render(&msgs, true).unwrap(), "<user>hi");
    let t = ChatTemplate::from_file(&dir.path().join("t.json"), None, Some("</s>".into())).unwrap();
    assert_eq!(t.render(&msgs, true).unwrap(), "</s>");
    assert!(matches!(
        ChatTemplate::from_file(&dir.path().join("bad.json"), None, None),
        Err(TemplateError::Invalid { .. })
    ));
    assert!(matches!(
        ChatTemplate::from_file(&dir.path().join("missing.jinja"), None, None),
        Err(TemplateError::Io { .. })
    ));
    let tok = load_tokenizer("tiny-mixtral").with_chat_template(Some(
        ChatTemplate::from_file(&dir.path().join("t.jinja"), None, None).unwrap(),
    ));
    assert_eq!(
        tok.chat_template().unwrap().render(&msgs, false).unwrap(),
        "<user>hi"
    );
}

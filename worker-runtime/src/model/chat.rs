//! Chat prompts rendered from the model's own `tokenizer.chat_template` with minijinja.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

use super::gguf::{Gguf, Value};

/// Errors rendering a chat prompt.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model has no chat template.
    #[error("the model has no tokenizer.chat_template; use /v1/completions")]
    NoTemplate,
    /// The template failed to compile or render (includes `raise_exception` messages).
    #[error("chat template: {0}")]
    Template(String),
}

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Text content.
    pub content: String,
}

/// Template instructions one render may run: the template comes from the model file, which may
/// come from anywhere (a URL, a PVC someone else fills), so a loop must not run unbounded.
/// Real templates use a few hundred per message.
pub const RENDER_FUEL: u64 = 5_000_000;
/// The longest prompt a render may produce, in bytes.
pub const MAX_RENDER_BYTES: usize = 8 << 20;

/// Refuses writes past [`MAX_RENDER_BYTES`].
struct Capped(String, bool);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDER_BYTES {
            self.1 = true;
            return Err(std::io::Error::other("too long"));
        }
        self.0.push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compile the template from the file's metadata.
    pub fn from_gguf(g: &Gguf, bos: String, eos: String) -> Result<Self, ChatError> {
        let src = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .ok_or(ChatError::NoTemplate)?;
        Self::new(src.to_string(), bos, eos)
    }

    /// Compile a template source.
    pub fn new(src: String, bos: String, eos: String) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned("chat", src)
            .map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// Render messages, ending with the assistant-turn opener.
    pub fn render(&self, messages: &[Message]) -> Result<String, ChatError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Template(e.to_string()))?;
        let mut out = Capped(String::new(), false);
        t.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            },
            &mut out,
        )
        .map_err(|e| {
            ChatError::Template(if out.1 {
                format!("the rendered prompt passed {} MiB", MAX_RENDER_BYTES >> 20)
            } else {
                e.to_string()
            })
        })?;
        Ok(out.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_and_raises() {
        let src = "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).expect("compile");
        let msg = |r: &str, c: &str| Message {
            role: r.into(),
            content: c.into(),
        };
        let out = t.render(&[msg("user", "hi")]).expect("render");
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = t.render(&[msg("bad", "x")]).expect_err("must raise");
        assert!(err.to_string().contains("no bad roles"), "{err}");
    }

    /// A template from an untrusted file cannot loop for ever or fill memory.
    #[test]
    fn runaway_templates_stop_with_an_error() {
        let msg = [Message {
            role: "user".into(),
            content: "x".into(),
        }];
        let spin =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(spin.into(), String::new(), String::new()).expect("compile");
        let err = t.render(&msg).expect_err("fuel runs out").to_string();
        assert!(err.contains("fuel"), "{err}");
        let big = "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}";
        let t = ChatTemplate::new(big.into(), String::new(), String::new()).expect("compile");
        let err = t.render(&msg).expect_err("output capped").to_string();
        assert!(err.contains("passed 8 MiB"), "{err}");
    }
}

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
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| ChatError::Template(e.to_string()))
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
}

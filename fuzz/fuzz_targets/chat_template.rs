//! Fuzz chat templates: a template (one of the shapes real models ship, or any source) renders
//! any messages and BOS/EOS strings to a prompt or fails with a typed error; it never panics.
//! (Without minijinja's fuel a template source can loop for a very long time; item 5 of issue
//! 17 gives the renderer a fuel budget.)
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use whaleflux_worker::model::chat::{ChatTemplate, Message};
use whaleflux_worker_fuzz::CHATML;

/// Templates in the shapes real GGUF files carry: ChatML (SmolLM2, Qwen2), Llama 3, Llama 2 /
/// Mistral with its role check and `raise_exception`.
const KNOWN: [&str; 3] = [
    CHATML,
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
];

#[derive(Arbitrary, Debug)]
struct Input {
    /// Ok: one of [`KNOWN`] by index; Err: this source.
    template: Result<u8, String>,
    bos: String,
    eos: String,
    messages: Vec<(String, String)>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let src = match &input.template {
        Ok(i) => KNOWN[usize::from(*i) % KNOWN.len()].to_string(),
        Err(s) => s.clone(),
    };
    let known = input.template.is_ok();
    let Ok(t) = ChatTemplate::new(src, input.bos.clone(), input.eos.clone()) else {
        assert!(!known, "a known template does not compile");
        return;
    };
    let messages: Vec<Message> = input
        .messages
        .iter()
        .take(16)
        .map(|(role, content)| Message {
            role: role.clone(),
            content: content.clone(),
        })
        .collect();
    match t.render(&messages) {
        Ok(out) => {
            if known {
                // Message text is data, never template code: each content appears verbatim
                // (ChatML and Llama 2 keep it as is; Llama 3 trims it).
                for m in &messages {
                    let c = m.content.trim();
                    if !c.is_empty() && input.template == Ok(0) {
                        assert!(out.contains(c), "content {c:?} lost in {out:?}");
                    }
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

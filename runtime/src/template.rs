//! Chat templates: the model's own Jinja template, rendered with minijinja.

use minijinja::{context, Environment};

use crate::{ChatMessage, Result, RuntimeError};

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, _> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| RuntimeError::InvalidRequest(format!("invalid chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Render the messages, ending with the prompt for the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.is_empty() {
            return Err(RuntimeError::InvalidRequest(
                "messages: must not be empty".into(),
            ));
        }
        let tmpl = self.env.get_template("chat").expect("added in new()");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| RuntimeError::InvalidRequest(format!("messages: chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The template SmolLM2-Instruct ships in its GGUF metadata.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_default_system_prompt_and_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[msg("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn keeps_a_given_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "", "").unwrap();
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"));
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}\
                   {% endif %}{{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "  hi ")]).unwrap(), "HI");
        let err = t.render(&[msg("system", "x")]).unwrap_err().to_string();
        assert!(err.contains("first must be user"), "{err}");
    }

    #[test]
    fn empty_messages_are_rejected() {
        let t = ChatTemplate::new(SMOLLM2, "", "").unwrap();
        assert!(t.render(&[]).is_err());
    }
}

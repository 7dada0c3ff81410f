//! Chat templates: the model's own Jinja template, rendered with minijinja. A chat that
//! offers tools is rendered with them (and with earlier calls and results as structured
//! data) where the template supports tools, and through the generic format otherwise.

mod tools;

use minijinja::{context, Environment};

pub use self::tools::{CallChoice, FunctionCall, ToolCall, ToolFormat, ToolOffer};
use crate::{ChatMessage, Result, RuntimeError};

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    tool_format: ToolFormat,
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
            tool_format: ToolFormat::detect(source),
        })
    }

    /// The tool format of the template.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Render the messages, ending with the prompt for the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.is_empty() {
            return Err(RuntimeError::InvalidRequest(
                "messages: must not be empty".into(),
            ));
        }
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let (messages, tools) = match self.tool_format {
            ToolFormat::Generic => (tools::generic(messages), None),
            _ => (
                tools::native(messages),
                tools::offer(messages).map(|o| o.functions.clone()),
            ),
        };
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| RuntimeError::InvalidRequest(format!("messages: chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests;

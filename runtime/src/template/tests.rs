//! Tests of chat templates: plain chats, and chats with tools in each template family (small
//! templates written here in each family's style) and in the generic format.

use serde_json::{json, Value};

use super::*;

// The template SmolLM2-Instruct ships in its GGUF metadata.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// Hermes / Qwen 2.5 style: tools in the system turn, calls in <tool_call> tags, results as
// <tool_response> in a user turn.
const HERMES: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Functions:
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

// Llama 3.x style: an ipython environment, tools as indented JSON, calls as
// {"name", "parameters"}, results in an ipython turn.
const LLAMA3: &str = r#"{{- bos_token }}
{%- if tools is not none %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
Answer a call as {"name": function name, "parameters": its arguments}.
{% for t in tools %}{{ t | tojson(indent=2) }}
{% endfor %}<|eot_id|>
{%- endif %}
{%- for m in messages %}
{%- if 'tool_calls' in m %}<|start_header_id|>assistant<|end_header_id|>

{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"#;

// Mistral style: tools before the last user turn, calls after [TOOL_CALLS], results with
// their call's id.
const MISTRAL: &str = r#"{{- bos_token }}
{%- for m in messages %}
{%- if m.role == 'user' %}
{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{"call_id": "{{ m.tool_call_id }}", "content": {{ m.content | tojson }}}[/TOOL_RESULTS]
{%- elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}
{%- endif %}
{%- endfor %}"#;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
}

fn offer(choice: CallChoice) -> ToolOffer {
    ToolOffer {
        functions: vec![weather()],
        choice,
        parallel: true,
    }
}

/// A question offering the weather tool; a call; its result.
fn chat_with_a_call() -> Vec<ChatMessage> {
    let mut question = msg("user", "Weather in Oslo?");
    question.tools = Some(offer(CallChoice::Auto));
    let mut call = msg("assistant", "");
    call.tool_calls = vec![ToolCall {
        id: "call_1".into(),
        kind: "function".into(),
        function: FunctionCall {
            name: "get_weather".into(),
            arguments: json!({"city": "Oslo"}),
        },
    }];
    let mut result = msg("tool", "12 C");
    result.tool_call_id = Some("call_1".into());
    vec![question, call, result]
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

#[test]
fn the_tool_format_is_read_from_the_template() {
    let format = |src: &str| ChatTemplate::new(src, "", "").unwrap().tool_format();
    assert_eq!(format(SMOLLM2), ToolFormat::Generic);
    assert_eq!(format(HERMES), ToolFormat::Hermes);
    assert_eq!(format(LLAMA3), ToolFormat::Llama3);
    assert_eq!(format(MISTRAL), ToolFormat::Mistral);
    assert_eq!(
        format("{% for t in tools %}{{ t.function.name }}{% endfor %}"),
        ToolFormat::Other
    );
    // Names that merely contain the word do not count.
    assert_eq!(
        format("{% for m in messages %}{{ m.tool_calls }}{{ my_tools }}{% endfor %}"),
        ToolFormat::Generic
    );
}

#[test]
fn hermes_templates_get_tools_calls_and_results() {
    let t = ChatTemplate::new(HERMES, "", "").unwrap();
    let out = t.render(&chat_with_a_call()).unwrap();
    let tool = r#"{"function":{"description":"Weather now","name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},"type":"object"}},"type":"function"}"#;
    let expected = format!(
        "<|im_start|>system\nFunctions:\n<tools>\n{tool}\n</tools>\nCall one as <tool_call>\
         {{\"name\": ..., \"arguments\": ...}}</tool_call><|im_end|>\n\
         <|im_start|>user\nWeather in Oslo?<|im_end|>\n\
         <|im_start|>assistant\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": \
         {{\"city\":\"Oslo\"}}}}\n</tool_call><|im_end|>\n\
         <|im_start|>user\n<tool_response>\n12 C\n</tool_response><|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(out, expected);
    // No offer: no tools section, the calls in the history still rendered.
    let mut chat = chat_with_a_call();
    chat[0].tools = None;
    let out = t.render(&chat).unwrap();
    assert!(
        out.starts_with("<|im_start|>user\nWeather in Oslo?"),
        "{out}"
    );
    assert!(
        out.contains("<tool_call>\n{\"name\": \"get_weather\""),
        "{out}"
    );
}

#[test]
fn llama3_templates_get_tools_calls_and_results() {
    let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "").unwrap();
    let out = t.render(&chat_with_a_call()).unwrap();
    assert!(
        out.starts_with(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("  \"function\": {\n    \"description\": \"Weather now\","),
        "{out}"
    );
    assert!(
        out.ends_with(
            "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \
         \"parameters\": {\"city\":\"Oslo\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\
         \n\n12 C<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "{out}"
    );
    // A plain chat renders no tool turn at all.
    let out = t.render(&[msg("user", "Hi")]).unwrap();
    assert!(
        !out.contains("ipython") && !out.contains("tool_calls"),
        "{out}"
    );
}

#[test]
fn mistral_templates_get_tools_calls_and_result_ids() {
    let t = ChatTemplate::new(MISTRAL, "<s>", "</s>").unwrap();
    let mut chat = chat_with_a_call();
    chat.push(msg("assistant", "12 degrees."));
    chat.push(msg("user", "And tomorrow?"));
    let out = t.render(&chat).unwrap();
    assert_eq!(
        out,
        "<s>[INST]Weather in Oslo?[/INST][TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": \
         {\"city\":\"Oslo\"}, \"id\": \"call_1\"}]</s>[TOOL_RESULTS]{\"call_id\": \"call_1\", \
         \"content\": \"12 C\"}[/TOOL_RESULTS]12 degrees.</s>[AVAILABLE_TOOLS][{\"function\":\
         {\"description\":\"Weather now\",\"name\":\"get_weather\",\"parameters\":{\"properties\":\
         {\"city\":{\"type\":\"string\"}},\"type\":\"object\"}},\"type\":\"function\"}]\
         [/AVAILABLE_TOOLS][INST]And tomorrow?[/INST]"
    );
}

#[test]
fn templates_without_tools_get_the_generic_format() {
    let t = ChatTemplate::new(SMOLLM2, "", "").unwrap();
    let out = t.render(&chat_with_a_call()).unwrap();
    let section = tools::section(&offer(CallChoice::Auto));
    // Key order follows serde_json's features, which the workspace unifies: compare as JSON.
    assert!(section.contains(r#""name":"get_weather""#), "{section}");
    assert!(
        section.contains(r#""description":"Weather now""#),
        "{section}"
    );
    assert!(section.ends_with("If no function is needed, answer in plain text."));
    let head = format!(
        "<|im_start|>system\n{section}<|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let tail = "<|im_end|>\n<|im_start|>tool\n12 C<|im_end|>\n<|im_start|>assistant\n";
    let call = out
        .strip_prefix(&head)
        .and_then(|rest| rest.strip_suffix(tail))
        .unwrap_or_else(|| panic!("{out}"));
    let call: serde_json::Value = serde_json::from_str(call).unwrap();
    let want = json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]});
    assert_eq!(call, want);
    // A given system prompt keeps its text, the section after it.
    let mut chat = vec![msg("system", "Be brief."), msg("user", "Hi")];
    chat[0].tools = Some(ToolOffer {
        parallel: false,
        ..offer(CallChoice::Function("get_weather".into()))
    });
    let out = t.render(&chat).unwrap();
    assert!(
        out.starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n"),
        "{out}"
    );
    assert!(
        out.contains("You must call a function now. Call get_weather. Make at most one call."),
        "{out}"
    );
}

#[test]
fn messages_without_tool_fields_read_and_write_as_before() {
    let m: ChatMessage = serde_json::from_value(json!({"role": "user", "content": "Hi"})).unwrap();
    assert!(m.tool_calls.is_empty() && m.tool_call_id.is_none() && m.tools.is_none());
    assert_eq!(
        serde_json::to_value(&m).unwrap(),
        json!({"role": "user", "content": "Hi"})
    );
    let chat = chat_with_a_call();
    let back: Vec<ChatMessage> =
        serde_json::from_value(serde_json::to_value(&chat).unwrap()).unwrap();
    assert_eq!(back[1].tool_calls, chat[1].tool_calls);
    assert_eq!(back[0].tools, chat[0].tools);
    assert_eq!(back[2].tool_call_id.as_deref(), Some("call_1"));
}

//! Tests of the generic tool format: parsing requests, prompts, answers and history.

use super::*;

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

fn tools(choice: Value) -> Tools {
    let time = json!({"type": "function", "function": {"name": "get_time"}});
    Tools::parse(&json!({"tools": [weather(), time], "tool_choice": choice}))
        .unwrap()
        .unwrap()
}

fn param(body: Value) -> String {
    Tools::parse(&body).unwrap_err().param.unwrap_or_default()
}

#[test]
fn requests_parse_with_auto_as_the_default() {
    assert!(Tools::parse(&json!({})).unwrap().is_none());
    let t = Tools::parse(&json!({"tools": [weather()]}))
        .unwrap()
        .unwrap();
    assert_eq!(t.choice, ToolChoice::Auto);
    assert!(t.parallel);
    assert_eq!(tools(json!("required")).choice, ToolChoice::Required);
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    assert_eq!(tools(named).choice, ToolChoice::Named("get_time".into()));
}

#[test]
fn bad_tools_are_refused_naming_the_field() {
    assert_eq!(
        param(json!({"tools": [{"type": "retrieval"}]})),
        "tools[0].type"
    );
    assert_eq!(
        param(json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
        "tools[0].function.name"
    );
    let bad_schema =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}});
    assert_eq!(
        param(json!({"tools": [bad_schema]})),
        "tools[0].function.parameters"
    );
    assert_eq!(param(json!({"tool_choice": "auto"})), "tool_choice");
    assert_eq!(
        param(json!({"tools": [weather()], "tool_choice": "always"})),
        "tool_choice"
    );
    let other = json!({"type": "function", "function": {"name": "nope"}});
    assert_eq!(
        param(json!({"tools": [weather()], "tool_choice": other})),
        "tool_choice.function.name"
    );
    assert_eq!(param(json!({"functions": []})), "functions");
    assert_eq!(
        param(json!({"tools": [weather(), weather()]})),
        "tools[1].function.name"
    );
}

#[test]
fn answers_in_the_generic_format_parse_into_calls() {
    let t = tools(json!("auto"));
    let calls = t
        .calls(r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#)
        .unwrap();
    assert_eq!(
        calls,
        vec![Call {
            name: "get_weather".into(),
            arguments: json!({"city": "Oslo"})
        }]
    );
    // A bare call, arguments as a string, in a fence: small models write these too.
    let calls = t
        .calls("```json\n{\"name\": \"get_time\", \"arguments\": \"{}\"}\n```")
        .unwrap();
    assert_eq!(calls[0].name, "get_time");
    assert_eq!(calls[0].arguments, json!({}));
    let two = r#"{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]}"#;
    assert_eq!(t.calls(two).unwrap().len(), 2);
}

#[test]
fn text_that_is_not_a_valid_call_stays_content() {
    let t = tools(json!("auto"));
    assert!(t.calls("It is sunny in Oslo.").is_none());
    assert!(t
        .calls(r#"{"tool_calls": [{"name": "launch_rocket", "arguments": {}}]}"#)
        .is_none());
    assert!(t.calls(r#"{"tool_calls": []}"#).is_none());
    assert!(t
        .calls(r#"{"tool_calls": [{"name": "get_time", "arguments": 3}]}"#)
        .is_none());
    assert!(t.calls(r#"{"city": "Oslo"}"#).is_none());
    let none = tools(json!("none"));
    assert!(none
        .calls(r#"{"name": "get_time", "arguments": {}}"#)
        .is_none());
    let single = Tools {
        parallel: false,
        ..tools(json!("auto"))
    };
    let two = r#"{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]}"#;
    assert!(single.calls(two).is_none());
}

#[test]
fn required_and_named_choices_constrain_to_the_call_schema() {
    assert!(tools(json!("auto")).grammar().is_none());
    let Some(Grammar::JsonSchema(s)) = tools(json!("required")).grammar() else {
        panic!()
    };
    // The generic object, a bare call, or a list of calls; each call of either function, its
    // arguments named `arguments` or (Llama 3) `parameters`.
    let shapes = s["anyOf"].as_array().unwrap();
    assert_eq!(shapes.len(), 3);
    let calls = shapes[0]["properties"]["tool_calls"]["items"]["anyOf"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 4);
    assert_eq!(shapes[1]["anyOf"].as_array().unwrap().len(), 4);
    assert_eq!(shapes[2]["minItems"], 1);
    assert!(constrain::check(&Grammar::JsonSchema(s.clone())).is_ok());
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let Some(Grammar::JsonSchema(s)) = tools(named).grammar() else {
        panic!()
    };
    let call = s["anyOf"][1]["anyOf"].as_array().unwrap();
    assert_eq!(call.len(), 2, "only the named function");
    assert_eq!(call[0]["properties"]["name"]["const"], "get_weather");
    assert_eq!(
        call[0]["properties"]["arguments"]["required"],
        json!(["city"])
    );
    assert_eq!(
        call[1]["properties"]["parameters"]["required"],
        json!(["city"])
    );
    let single = Tools {
        parallel: false,
        ..tools(json!("required"))
    };
    let Some(Grammar::JsonSchema(s)) = single.grammar() else {
        panic!()
    };
    assert_eq!(s["anyOf"][2]["maxItems"], 1);
}

#[test]
fn the_tools_are_offered_with_the_first_message() {
    let mut m = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Weather in Oslo?"),
    ];
    tools(json!("required")).prompt(&mut m);
    assert_eq!(m.len(), 2, "the template, not the host, writes the tools");
    let offer = m[0].tools.as_ref().expect("offered on the first message");
    assert_eq!(offer.choice, CallChoice::Required);
    assert_eq!(offer.functions[0]["function"]["name"], "get_weather");
    assert_eq!(offer.functions[1]["function"]["name"], "get_time");
    assert!(m[1].tools.is_none());
    let mut m = vec![ChatMessage::new("user", "Hi")];
    tools(json!("none")).prompt(&mut m);
    assert!(m[0].tools.is_none(), "tool_choice none offers nothing");
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    tools(named).prompt(&mut m);
    let choice = &m[0].tools.as_ref().unwrap().choice;
    assert_eq!(*choice, CallChoice::Function("get_time".into()));
}

#[test]
fn earlier_calls_and_results_go_into_the_history_as_data() {
    let body = json!({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    ]});
    let mut m: Vec<ChatMessage> = ["user", "assistant", "tool"]
        .iter()
        .map(|r| ChatMessage::new(*r, ""))
        .collect();
    history(&body, &mut m).unwrap();
    let call = &m[1].tool_calls[0];
    assert_eq!(call.id, "call_1");
    assert_eq!(call.function.name, "get_weather");
    assert_eq!(call.function.arguments, json!({"city": "Oslo"}));
    assert_eq!(m[2].tool_call_id.as_deref(), Some("call_1"));
    let bad = json!({"messages": [{"role": "user", "content": "x", "tool_calls": [1]}]});
    let e = history(&bad, &mut m[..1]).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls"));
}

#[test]
fn calls_come_back_in_openai_shape() {
    let calls = vec![Call {
        name: "get_time".into(),
        arguments: json!({"tz": "UTC"}),
    }];
    let v = to_openai(&calls, "abc", true);
    assert_eq!(v[0]["id"], "call_abc_0");
    assert_eq!(v[0]["type"], "function");
    assert_eq!(v[0]["index"], 0);
    let args: Value =
        serde_json::from_str(v[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"tz": "UTC"}));
}

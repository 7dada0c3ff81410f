//! Unit tests of the v2 request mapping: parameters and inputs are checked before any work.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    check_id, generate_request, grpc,
    pb::{infer_parameter::ParameterChoice, InferParameter, ModelInferRequest},
    take_input, Data, Tensor,
};

fn params(v: Value) -> BTreeMap<String, Value> {
    v.as_object().unwrap().clone().into_iter().collect()
}

fn err(v: Value) -> String {
    generate_request("hi".into(), &params(v))
        .unwrap_err()
        .message
}

#[test]
fn out_of_range_parameters_are_refused_by_name() {
    assert!(err(json!({"top_k": -5})).contains("parameters.top_k"));
    assert!(err(json!({"seed": -1})).contains("parameters.seed"));
    assert!(err(json!({"seed": 1.5})).contains("parameters.seed"));
    assert!(err(json!({"max_tokens": 0})).contains("parameters.max_tokens"));
    assert!(err(json!({"max_tokens": 1e20})).contains("parameters.max_tokens"));
    assert!(err(json!({"temperature": "hot"})).contains("parameters.temperature"));
    assert!(err(json!({"stop": "[not json"})).contains("parameters.stop"));
    assert!(err(json!({"stop": ["a", "b", "c", "d", "e"]})).contains("at most 4"));
    assert!(err(json!({"stop": [1]})).contains("only strings"));
}

#[test]
fn non_finite_grpc_parameters_are_refused_by_name() {
    let decode = |key: &str, d: f64| {
        let mut req = ModelInferRequest::default();
        let p = InferParameter {
            parameter_choice: Some(ParameterChoice::DoubleParam(d)),
        };
        req.parameters.insert(key.into(), p);
        grpc::decode(req)
    };
    for (key, d) in [
        ("max_tokens", f64::NAN),
        ("temperature", f64::INFINITY),
        ("top_p", f64::NAN),
        ("seed", f64::NEG_INFINITY),
    ] {
        let e = decode(key, d).expect_err(key);
        assert_eq!(
            super::status::grpc_code(&e),
            tonic::Code::InvalidArgument,
            "{key}"
        );
        assert_eq!(e.param.as_deref(), Some(&*format!("parameters.{key}")));
        assert!(e.message.contains("finite"), "{}", e.message);
    }
    assert_eq!(
        decode("temperature", 0.5).unwrap().parameters["temperature"],
        json!(0.5)
    );
}

#[test]
fn good_parameters_map_to_sampling() {
    let g = generate_request(
        "hi".into(),
        &params(json!({"top_k": 5, "seed": "7", "stop": "[\"\\n\", \"END\"]", "max_tokens": 3})),
    )
    .unwrap();
    assert_eq!(g.sampling.top_k, 5);
    assert_eq!(g.sampling.seed, Some(7));
    assert_eq!(g.stop, vec!["\n".to_string(), "END".to_string()]);
    assert_eq!(g.max_tokens, Some(3));
    let g = generate_request("hi".into(), &params(json!({"stop": "plain"}))).unwrap();
    assert_eq!(g.stop, vec!["plain".to_string()]);
}

#[test]
fn inputs_must_match_their_shape_without_overflow() {
    let t = |shape: Vec<i64>, n: usize| Tensor {
        name: "text".into(),
        datatype: "BYTES".into(),
        shape,
        data: Data::Bytes(vec![b"x".to_vec(); n]),
    };
    assert!(take_input(&[t(vec![2], 2)], "text", "m").is_ok());
    assert!(take_input(&[t(vec![3], 2)], "text", "m").is_err());
    assert!(take_input(&[t(vec![-1], 1)], "text", "m").is_err());
    assert!(take_input(&[t(vec![i64::MAX, 4], 1)], "text", "m").is_err());
    assert!(take_input(&[t(vec![1], 1)], "text_input", "m").is_err());
}

#[test]
fn client_ids_are_bounded() {
    assert_eq!(check_id(Some("abc")).unwrap().as_deref(), Some("abc"));
    assert!(check_id(Some(&"x".repeat(257))).is_err());
    assert_eq!(check_id(None).unwrap(), None);
}

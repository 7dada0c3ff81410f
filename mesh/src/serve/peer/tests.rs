//! The peer format: errors crossing over, lines, a peer that dies.

use super::*;

#[test]
fn an_error_crosses_with_its_kind_code_and_headers() {
    let mut e = ServeError::new(ErrorKind::RateLimited, "rate_limited", "slow down");
    e.retry_after = Some(7);
    e.headers = vec![("x-ratelimit-limit-requests", "10".into())];
    let back = ServeError::from(
        serde_json::from_str::<WireError>(&serde_json::to_string(&WireError::from(&e)).unwrap())
            .unwrap(),
    );
    assert_eq!(back.kind, ErrorKind::RateLimited);
    assert_eq!(back.code, "rate_limited");
    assert_eq!(back.retry_after, Some(7));
    assert_eq!(back.headers, e.headers);
    assert_eq!(back.http_status(), 429);
}

/// A peer that answers `served` and then dies.
async fn dying_peer() -> String {
    let app = axum::Router::new().route(
        PATH,
        axum::routing::post(|| async {
            let head = serde_json::to_vec(&WireEvent::Served {
                id: "x".into(),
                model: "m".into(),
                node: "dying".into(),
            })
            .unwrap();
            let lines = futures::stream::iter(vec![
                Ok::<_, std::io::Error>([head, b"\n".to_vec()].concat()),
                Err(std::io::Error::other("killed")),
            ]);
            axum::body::Body::from_stream(lines)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_peer_gone_before_its_first_token_hands_the_request_back() {
    let url = dying_peer().await;
    let call = Call {
        node: "dying",
        url: &url,
        origin: "here",
        authorization: None,
        mesh_token: None,
    };
    let wire = WireRequest {
        model: "m".into(),
        fallbacks: Vec::new(),
        endpoint: "chat_completions".into(),
        work: WireWork::Generate(GenerateRequest {
            prompt: flatmesh_runtime::Prompt::Text("hi".into()),
            max_tokens: Some(4),
            sampling: Default::default(),
            stop: Vec::new(),
        }),
        keep_alive: None,
        client_id: None,
        stream: true,
        timeout_ms: None,
    };
    let after = After {
        remember: None,
        span: tracing::Span::none(),
    };
    let got = serve(call, &wire, &Metrics::new(), after).await;
    assert!(
        got.is_err(),
        "the caller serves it: nothing reached the client"
    );
}

#[tokio::test]
async fn lines_split_across_chunks_are_joined() {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(br#"{"text":"he"#.to_vec()),
        Ok(b"llo\"}\n{\"text\":\"!\"}\n".to_vec()),
    ];
    let got: Vec<_> = json_lines(futures::stream::iter(chunks)).collect().await;
    assert_eq!(got.len(), 2);
    assert!(matches!(&got[0], Ok(WireEvent::Text(t)) if t == "hello"));
}

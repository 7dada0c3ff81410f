//! The peer format: errors crossing over, lines, a peer that dies.

use super::*;

#[test]
fn an_error_crosses_with_its_kind_code_and_quotas() {
    let mut e = ServeError::new(ErrorKind::RateLimited, "rate_limited", "slow down");
    e.retry_after = Some(7);
    e.quotas = Some(Box::new(crate::tenancy::limits::Quotas {
        requests: Some(crate::tenancy::limits::Quota {
            limit: 10,
            remaining: 0,
            reset: 7,
        }),
        tokens: None,
    }));
    let back = ServeError::from(
        serde_json::from_str::<WireError>(&serde_json::to_string(&WireError::from(&e)).unwrap())
            .unwrap(),
    );
    assert_eq!(back.kind, ErrorKind::RateLimited);
    assert_eq!(back.code, "rate_limited");
    assert_eq!(back.retry_after, Some(7));
    assert_eq!(back.quotas, e.quotas);
    assert_eq!(back.policy_status, None);
}

/// How a fake peer's answer ends after its lines.
#[derive(Clone, Copy)]
enum End {
    /// The connection breaks (the peer was killed).
    Dies,
    /// Nothing more, ever (a peer that does not stop).
    Hangs,
}

/// A peer that answers `served`, then `lines`, then ends as `end` says.
async fn fake_peer(lines: Vec<WireEvent>, end: End) -> String {
    let served = WireEvent::Served {
        id: "x".into(),
        model: "m".into(),
        node: "fake".into(),
    };
    let body: Vec<Vec<u8>> = std::iter::once(&served)
        .chain(&lines)
        .map(|ev| [serde_json::to_vec(ev).unwrap(), b"\n".to_vec()].concat())
        .collect();
    let app = axum::Router::new().route(
        PATH,
        axum::routing::post(move || {
            let lines = futures::stream::iter(body.clone().into_iter().map(Ok));
            let end = match end {
                End::Dies => {
                    futures::stream::iter(vec![Err(std::io::Error::other("killed"))]).boxed()
                }
                End::Hangs => futures::stream::pending().boxed(),
            };
            async move { axum::body::Body::from_stream(lines.chain(end)) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn call(url: &str, deadline: Option<Instant>) -> Call<'_> {
    Call {
        node: "fake",
        url,
        origin: "here",
        authorization: None,
        mesh_token: None,
        deadline,
    }
}

fn wire() -> WireRequest {
    WireRequest {
        model: "m".into(),
        fallbacks: Vec::new(),
        endpoint: "chat_completions".into(),
        work: WireWork::Generate(GenerateRequest {
            prompt: flatmesh_runtime::Prompt::Text("hi".into()),
            max_tokens: Some(4),
            sampling: Default::default(),
            stop: Vec::new(),
            n: 1,
            logprobs: None,
        }),
        keep_alive: None,
        client_id: None,
        stream: true,
        timeout_ms: None,
    }
}

fn after() -> After {
    After {
        remember: None,
        span: tracing::Span::none(),
    }
}

#[tokio::test]
async fn a_peer_gone_before_its_first_token_hands_the_request_back() {
    let url = fake_peer(Vec::new(), End::Dies).await;
    let got = serve(call(&url, None), &wire(), &Metrics::new(), after()).await;
    assert!(
        got.is_err(),
        "the caller serves it: nothing reached the client"
    );
}

#[tokio::test]
async fn a_peer_stream_that_outlives_the_deadline_is_ended_here() {
    let url = fake_peer(vec![WireEvent::Text("hi".into())], End::Hangs).await;
    let deadline = Instant::now() + Duration::from_millis(100);
    let served = serve(
        call(&url, Some(deadline)),
        &wire(),
        &Metrics::new(),
        after(),
    )
    .await
    .ok()
    .expect("the peer answered")
    .expect("it served");
    let Output::Text(g) = served.output else {
        panic!("a generation")
    };
    let e = tokio::time::timeout(Duration::from_secs(5), g.collect())
        .await
        .expect("the stream ended")
        .unwrap_err();
    assert_eq!(e.code, "deadline_exceeded");
    let late = Instant::now().duration_since(deadline);
    assert!(
        late >= DEADLINE_GRACE && late < DEADLINE_GRACE * 2,
        "{late:?}"
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

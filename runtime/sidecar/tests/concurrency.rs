//! 500 concurrent streaming calls against a budget that fits 100 worst-case reserves: spend never
//! passes the limit, every call gets CONTINUE or a clean STOP, and nothing is left open.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_streams_against_a_budget_for_one_hundred() {
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", true)).unwrap();
    // The proxy's worst case: (body bytes + 64) input tokens at 150 nano-USD and the contract's
    // 4096 output tokens at 600 nano-USD.
    let worst_case = (body.len() as i64 + 64) * 150 + 4096 * 600;
    let limit = 100 * worst_case;
    let mut stack = Stack::start(Options {
        limit,
        ..Options::default()
    })
    .await;
    let chat = stack.url("/v1/chat/completions");
    let calls: Vec<_> = (0..500)
        .map(|_| {
            let (chat, body) = (chat.clone(), body.clone());
            tokio::spawn(async move {
                post(&chat, &[OPENAI_KEY, ("x-mock-chunk-delay-ms", "20")], &body).await
            })
        })
        .collect();
    let mut outcomes: BTreeMap<(u16, String), usize> = BTreeMap::new();
    let mut continued = 0i64;
    for call in calls {
        let reply = call.await.unwrap();
        let code = match reply.status {
            200 => {
                let text = String::from_utf8_lossy(&reply.body);
                assert!(text.ends_with("data: [DONE]\n\n"), "a complete stream");
                continued += 1;
                "CONTINUE".to_owned()
            }
            _ => reply.json()["error"]["code"].as_str().unwrap().to_owned(),
        };
        *outcomes.entry((reply.status, code)).or_default() += 1;
    }
    println!("outcomes: {outcomes:?}");
    for (status, code) in outcomes.keys() {
        assert!(
            (*status == 200 && code == "CONTINUE")
                || (*status == 402 && code == "BUDGET_EXHAUSTED"),
            "unexpected outcome {status} {code}"
        );
    }
    assert!(continued >= 100, "the first 100 worst cases fit");
    assert!(continued < 500, "the budget did not fit every call at once");

    let balance = stack.settled_balance().await;
    assert!(balance.committed_nano_usd <= limit);
    assert_eq!(balance.committed_nano_usd, continued * 10_950);
    assert_eq!(balance.overrun_nano_usd, 0);
    stack.wait_no_open_calls().await;
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}

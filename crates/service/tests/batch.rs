//! Batch summaries against a real PostgreSQL.

#![allow(clippy::unwrap_used)] // A failed step is a failed test; unwrap says where.

mod support;

use rust_decimal::Decimal;
use service::BatchError;
use support::{test_config, uids, world};

#[tokio::test]
async fn results_come_back_in_input_order_with_duplicates_once() {
    for chunk_size in [1, 2, 50] {
        let mut config = test_config();
        config.batch.chunk_size = chunk_size;
        let w = world(config).await;
        let summary = w
            .service
            .summaries(&uids(&[3, 1, 99, 3, 2, 1]))
            .await
            .unwrap();
        let ids: Vec<i64> = summary.results.iter().map(|r| r.user_id.get()).collect();
        assert_eq!(ids, vec![3, 1, 2], "chunk size {chunk_size}");
        assert_eq!(summary.results[1].order_count, 2);
        assert_eq!(summary.results[1].total_amount, Decimal::new(5009, 2));
        assert_eq!(summary.results[2].order_count, 0);
        assert_eq!(summary.results[2].total_amount, Decimal::ZERO);
        assert_eq!(summary.errors.len(), 1);
        assert_eq!(summary.errors[0].user_id, 99);
        assert_eq!(summary.errors[0].kind, "not_found");

        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["results"][1]["total_amount"], "50.09");
        assert_eq!(json["results"][0]["profile"]["username"], "cy");
    }
}

#[tokio::test]
async fn a_thousand_ids_are_summarised() {
    let w = world(test_config()).await;
    let ids: Vec<i64> = (1..=1000).rev().collect();
    let summary = w.service.summaries(&uids(&ids)).await.unwrap();
    assert_eq!(
        summary
            .results
            .iter()
            .map(|r| r.user_id.get())
            .collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    assert_eq!(summary.errors.len(), 997);
    assert_eq!(summary.errors[0].user_id, 1000);
}

#[tokio::test]
async fn unusable_batches_are_refused() {
    let w = world(test_config()).await;
    for (ids, message) in [
        (vec![], "user_ids must not be empty"),
        (
            vec![1; 1001],
            "user_ids has 1001 ids; at most 1000 are allowed",
        ),
    ] {
        let err = w.service.summaries(&uids(&ids)).await.unwrap_err();
        assert!(matches!(err, BatchError::Invalid(_)), "{err:?}");
        assert_eq!(err.to_string(), message);
    }
}

#[tokio::test]
async fn a_closed_pool_fails_the_whole_batch() {
    let mut config = test_config();
    config.batch.chunk_size = 1;
    config.batch.concurrency = 2;
    let w = world(config).await;
    w.service.close();
    let err = w
        .service
        .summaries(&uids(&(1..=100).collect::<Vec<_>>()))
        .await
        .unwrap_err();
    assert!(matches!(err, BatchError::Unavailable(_)), "{err:?}");
    assert_eq!(support::live_children_settled().await, 0);
}

//! The price feed: the KuCoin connector against the exchange simulator, feed
//! replicas deduplicated by JetStream, the latest-price cache and snapshots.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::config::Config;
use switchyard::feed::simulator::{Simulator, SimulatorOptions};

const SYMBOLS: [&str; 3] = ["BTC-USDT", "ETH-USDT", "SOL-USDT"];

async fn simulator(rate: f64, ping: Duration, pong_within: Duration) -> Simulator {
    let opts = SimulatorOptions {
        symbols: SYMBOLS.iter().map(|s| s.to_string()).collect(),
        rate,
        ping_interval: ping,
        ping_timeout: pong_within,
    };
    let any = "127.0.0.1:0".parse().unwrap();
    Simulator::start(opts, any, any).await.unwrap()
}

/// A config whose embedded KuCoin connector reads `sim` into `feedtest.<SYMBOL>`.
fn with_connector(mut c: Config, sim: &Simulator) -> Config {
    c.feed.embedded = true;
    c.feed.namespace = "feedtest".into();
    c.feed.stale_after = Duration::from_millis(500);
    c.feed.kucoin.enabled = true;
    c.feed.kucoin.rest_url = sim.rest_url.clone();
    c.feed.kucoin.symbols = SYMBOLS.iter().map(|s| s.to_string()).collect();
    // Two per subscribe: the connector must split its subscription.
    c.feed.kucoin.symbols_per_subscribe = 2;
    c.feed.kucoin.backoff_min = Duration::from_millis(100);
    c.feed.kucoin.backoff_max = Duration::from_millis(1600);
    c.feed.kucoin.connect_timeout = Duration::from_secs(2);
    c
}

/// Exchange sequences stored on `feedtest.<symbol>`, in publication order.
async fn published(addr: std::net::SocketAddr, symbol: &str) -> Vec<u64> {
    let (status, h) = api(
        addr,
        "GET",
        &format!("/api/v1/history/feedtest.{symbol}?limit=100000"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{h}");
    h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["sequence"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn link(node: &switchyard::node::Node) -> Value {
    serde_json::to_value(&node.feed.status()[0]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_publishes_in_order_and_misses_nothing_after_a_reconnect() {
    let sim = simulator(50.0, Duration::from_secs(10), Duration::from_secs(5)).await;
    let gw = start(with_connector(config(), &sim)).await;
    let mut c = connect_as(gw.addr, "trader", &[]).await;
    c.subscribe("feedtest.ETH-USDT").await;
    let first = c.recv_type("msg").await;
    let tick = &first["data"];
    assert_eq!(
        (&tick["symbol"], &tick["source"]),
        (&json!("ETH-USDT"), &json!("kucoin"))
    );
    for field in ["price", "size", "best_bid", "best_ask", "sequence"] {
        assert!(
            tick[field].is_string(),
            "{field} is a decimal string: {tick}"
        );
    }
    assert!(tick["time"].is_u64());

    eventually(WAIT, "ticks of every symbol", || async {
        let mut all = true;
        for s in SYMBOLS {
            all &= published(gw.addr, s).await.len() >= 10;
        }
        all.then_some(())
    })
    .await;
    assert_eq!(sim.connections(), 1);
    assert_eq!(sim.token_requests(), 1);

    sim.drop_connections();
    eventually(WAIT, "a new token and connection", || async {
        (sim.connections() == 2 && sim.sent_on(1).len() >= 60).then_some(())
    })
    .await;
    assert_eq!(
        sim.token_requests(),
        2,
        "a fresh token for the new connection"
    );
    let after_reconnect = sim.sent_on(1);
    eventually(
        WAIT,
        "every tick sent after the reconnect is published",
        || async {
            let mut missing = 0;
            for s in SYMBOLS {
                let got: BTreeSet<u64> = published(gw.addr, s).await.into_iter().collect();
                missing += after_reconnect
                    .iter()
                    .filter(|(sym, seq)| sym == s && !got.contains(seq))
                    .count();
            }
            (missing == 0).then_some(())
        },
    )
    .await;
    for s in SYMBOLS {
        let seqs = published(gw.addr, s).await;
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{s}: published in increasing sequence"
        );
    }
    assert_eq!(link(&gw.node)["reconnects"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_pongs_are_a_dead_link_and_malformed_messages_are_skipped() {
    let sim = simulator(20.0, Duration::from_millis(150), Duration::from_millis(300)).await;
    let gw = start(with_connector(config(), &sim)).await;
    eventually(WAIT, "the link is up and ticking", || async {
        (link(&gw.node)["ticks"].as_u64() >= Some(5)).then_some(())
    })
    .await;

    sim.send_malformed();
    eventually(WAIT, "malformed messages counted", || async {
        (link(&gw.node)["malformed"].as_u64() >= Some(4)).then_some(())
    })
    .await;
    let ticks = link(&gw.node)["ticks"].as_u64().unwrap();
    eventually(WAIT, "ticks continue on the same connection", || async {
        (link(&gw.node)["ticks"].as_u64() > Some(ticks + 10)).then_some(())
    })
    .await;
    assert_eq!(sim.connections(), 1, "skipping them did not cost the link");

    sim.stall_pongs(true);
    let stalled = tokio::time::Instant::now();
    eventually(WAIT, "a dead link is noticed and replaced", || async {
        (sim.connections() >= 2).then_some(())
    })
    .await;
    // Ping every 150 ms, pong due within 300 ms, then at most 200 ms of backoff.
    assert!(
        stalled.elapsed() < Duration::from_millis(1500),
        "{:?}",
        stalled.elapsed()
    );
    sim.stall_pongs(false);
    let n = sim.connections();
    let ticks = link(&gw.node)["ticks"].as_u64().unwrap();
    eventually(WAIT, "ticking again on the new link", || async {
        (link(&gw.node)["ticks"].as_u64() > Some(ticks + 10)).then_some(())
    })
    .await;
    assert_eq!(sim.connections(), n, "and it stays up once pongs come back");
    assert!(sim.pings() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_back_off_instead_of_looping() {
    let sim = simulator(20.0, Duration::from_secs(10), Duration::from_secs(5)).await;
    let gw = start(with_connector(config(), &sim)).await;
    eventually(WAIT, "connected", || async {
        (link(&gw.node)["ticks"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    sim.refuse_tokens(4);
    let refused_from = tokio::time::Instant::now();
    sim.drop_connections();
    eventually(WAIT, "connected again after the refusals", || async {
        (sim.connections() == 2).then_some(())
    })
    .await;
    // 1 + 4 refused + 1 granted; waits of at least 50, 100, 200, 400 ms in between
    // (half of 100 ms doubling, the jitter's floor).
    assert_eq!(sim.token_requests(), 6);
    assert!(
        refused_from.elapsed() >= Duration::from_millis(750),
        "backed off: {:?}",
        refused_from.elapsed()
    );
    let (status, metrics) = {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (out.starts_with("HTTP/1.1 200"), out)
    };
    assert!(status);
    assert!(
        metrics.contains("switchyard_feed_reconnects_total{source=\"kucoin\"} 5"),
        "{metrics}"
    );
}

fn feed_config(nats: &NatsServer, sim: &Simulator) -> Config {
    let mut c = with_connector(cluster_config(nats, "feed"), sim);
    c.feed.embedded = false;
    c.feed.listen = "127.0.0.1:0".parse().unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_feed_replicas_publish_each_tick_once() {
    let nats = NatsServer::start();
    let sim = simulator(40.0, Duration::from_secs(10), Duration::from_secs(5)).await;
    let gw = start(cluster_config(&nats, "gw")).await;
    let one = switchyard::feed::standalone::start(feed_config(&nats, &sim))
        .await
        .unwrap();
    let two = switchyard::feed::standalone::start(feed_config(&nats, &sim))
        .await
        .unwrap();
    eventually(WAIT, "both replicas are linked and ready", || async {
        let a = http(one.addr, "GET", "/readyz", &[], None).await.0;
        let b = http(two.addr, "GET", "/readyz", &[], None).await.0;
        (a == 200 && b == 200 && sim.connections() == 2).then_some(())
    })
    .await;
    eventually(WAIT, "ticks flowing", || async {
        (sim.sent_on(0).len() >= 150 && sim.sent_on(1).len() >= 150).then_some(())
    })
    .await;
    // The ticks both replicas had received by now must all be published, once.
    let (cut0, cut1) = (sim.sent_on(0), sim.sent_on(1));
    let both: BTreeSet<&(String, u64)> = cut0.iter().filter(|t| cut1.contains(t)).collect();
    assert!(both.len() > 120, "both replicas got the same ticks");
    eventually(
        WAIT,
        "every tick both replicas received is published",
        || async {
            let mut missing = 0;
            for s in SYMBOLS {
                let got: BTreeSet<u64> = published(gw.addr, s).await.into_iter().collect();
                missing += both
                    .iter()
                    .filter(|(sym, q)| sym == s && !got.contains(q))
                    .count();
            }
            (missing == 0).then_some(())
        },
    )
    .await;
    one.shutdown.trigger();
    two.shutdown.trigger();
    let _ = one.task.await;
    let _ = two.task.await;

    let sent: BTreeSet<(String, u64)> = sim.sent_on(0).into_iter().chain(sim.sent_on(1)).collect();
    for s in SYMBOLS {
        let seqs = published(gw.addr, s).await;
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(unique.len(), seqs.len(), "{s}: no tick published twice");
        assert!(
            unique.iter().all(|q| sent.contains(&(s.to_string(), *q))),
            "{s}: only ticks the exchange sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_readiness_follows_the_exchange_link() {
    let nats = NatsServer::start();
    let sim = simulator(20.0, Duration::from_secs(10), Duration::from_secs(5)).await;
    let feed = switchyard::feed::standalone::start(feed_config(&nats, &sim))
        .await
        .unwrap();
    eventually(WAIT, "ready", || async {
        (http(feed.addr, "GET", "/readyz", &[], None).await.0 == 200).then_some(())
    })
    .await;
    sim.refuse_tokens(1_000);
    sim.drop_connections();
    let body: Value = eventually(WAIT, "not ready without a link", || async {
        let (status, body) = http(feed.addr, "GET", "/readyz", &[], None).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["links"][0]["connected"], false, "{body}");
    assert_eq!(http(feed.addr, "GET", "/healthz", &[], None).await.0, 200);
    // A feed needs the cluster engine and a connector.
    let mut single = config();
    single.feed.synthetic.enabled = true;
    let e = switchyard::feed::standalone::start(single)
        .await
        .err()
        .unwrap();
    assert!(e.0.contains("engine.kind"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_price_comes_first_is_served_by_the_api_and_survives_a_restart() {
    let redis = RedisServer::start();
    let mut c = config();
    c.redis.url = redis.url.clone();
    c.feed.embedded = true;
    c.feed.synthetic.enabled = true;
    c.feed.synthetic.symbols = vec!["BTC-USDT".into(), "ETH-USDT".into()];
    c.feed.synthetic.rate = 20.0;
    let gw = start(c.clone()).await;

    let mut t = connect_as(gw.addr, "trader", &[]).await;
    // Wait for a price to exist, then subscribe: the newest arrives first.
    eventually(WAIT, "a cached price", || async {
        let (status, _) = api(gw.addr, "GET", "/api/v1/prices/BTC-USDT", None).await;
        (status == 200).then_some(())
    })
    .await;
    let r = t.subscribe("prices.BTC-USDT").await;
    assert_eq!(r["replayed"], 1, "{r}");
    let snap = t.recv_type("msg").await;
    assert_eq!(snap["data"]["symbol"], "BTC-USDT");
    let next = t.recv_type("msg").await;
    let seq = |m: &Value| {
        m["data"]["sequence"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(seq(&next) > seq(&snap), "then every tick after it");

    let (status, p) = api(gw.addr, "GET", "/api/v1/prices/BTC-USDT", None).await;
    assert_eq!(status, 200);
    assert_eq!(p["tick"]["source"], "synthetic");
    assert!(p["age_ms"].as_u64().unwrap() < 5_000, "{p}");
    let (_, all) = api(gw.addr, "GET", "/api/v1/prices", None).await;
    let symbols: Vec<&str> = all["prices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(symbols, ["BTC-USDT", "ETH-USDT"]);
    let (status, _) = api(gw.addr, "GET", "/api/v1/prices/NOPE-USDT", None).await;
    assert_eq!(status, 404);
    let (status, _) = api(gw.addr, "GET", "/api/v1/prices/bad.symbol", None).await;
    assert_eq!(status, 400);

    // Stop the node (and its feed); a new node without a feed serves the last price.
    drop(t);
    gw.node.shutdown.trigger();
    gw.task.await.unwrap();
    // The node wrote its newest price before it stopped.
    let stored: BTreeMap<String, String> = {
        let mut conn = redis.client().await;
        redis::cmd("HGETALL")
            .arg("sy:price:BTC-USDT")
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    let mut again = c.clone();
    again.feed.embedded = false;
    let gw2 = start(again).await;
    let (status, p2) = api(gw2.addr, "GET", "/api/v1/prices/BTC-USDT", None).await;
    assert_eq!(status, 200, "{p2}");
    assert_eq!(
        p2["tick"]["sequence"].as_str(),
        stored.get("sequence").map(String::as_str)
    );
    assert!(
        p2["tick"]["sequence"]
            .as_str()
            .map(|s| s.parse::<u64>().unwrap())
            >= Some(seq(&next))
    );
}

/// Ticks submitted while NATS is down are retried with their `msg_id` and land
/// once NATS is back, each once and in order (a 113 means "outcome unknown":
/// retry the same way); a tick submitted again is deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_are_retried_with_their_msg_id_in_order_until_the_broker_is_back() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use switchyard::feed::{cache::MemoryPrices, Dispatcher, LinkHealth, Tick, TickSink};
    let mut nats = NatsServer::start();
    let reader = start(cluster_config(&nats, "reader")).await;
    nats.stop();
    let broker = switchyard::engine::nats::NatsBroker::connect(
        &cluster_config(&nats, "feed"),
        Arc::new(switchyard::engine::NoDeliveries),
    )
    .await
    .unwrap();
    let sink = Arc::new(TickSink::new(
        broker,
        Arc::new(MemoryPrices::default()),
        "feedtest",
        Duration::from_secs(20),
    ));
    let link = Arc::new(LinkHealth::default());
    let mut out = Dispatcher::new(sink, Arc::clone(&link), "test");
    let tick = |symbol: &str, sequence: u64| Tick {
        symbol: symbol.into(),
        price: "1.5".into(),
        size: "1".into(),
        best_bid: "1.4".into(),
        best_ask: "1.6".into(),
        time: now() * 1000,
        sequence: sequence.to_string(),
        source: "test".into(),
    };
    for sequence in 1..=5 {
        for symbol in ["RETRY-USDT", "AGAIN-USDT"] {
            out.submit(tick(symbol, sequence)).await;
        }
    }
    // Without the retry they fail at once: the broker is not connected.
    assert_eq!(link.ticks.load(Ordering::Relaxed), 0);
    nats.restart();
    let stored = |n: u64| {
        let link = Arc::clone(&link);
        move || {
            let done = link.ticks.load(Ordering::Relaxed) >= n;
            async move { done.then_some(()) }
        }
    };
    eventually(WAIT, "ten ticks stored", stored(10)).await;
    out.submit(tick("RETRY-USDT", 5)).await;
    eventually(WAIT, "the repeat acknowledged", stored(11)).await;
    for symbol in ["RETRY-USDT", "AGAIN-USDT"] {
        assert_eq!(published(reader.addr, symbol).await, [1, 2, 3, 4, 5]);
    }
}

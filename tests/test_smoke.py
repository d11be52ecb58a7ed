def test_moto_roundtrip(landing, make_client):
    client = make_client(use_async_requests=True, **landing.client_options())
    for i in range(1000):
        client.metric("rows", i)
    assert client.flush_metrics_buffer(timeout=30)
    values = sorted(r["value"] for r in landing.records("metric"))
    assert values == [float(i) for i in range(1000)]

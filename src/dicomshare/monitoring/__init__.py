"""Remote monitoring: events (an outbox), webhooks per organisation, watchlists."""

"""Input data: readers and splits of labeled texts and of prompt/completion pairs, the audit and PII redaction, the token cache, the packaged quickstart sets."""

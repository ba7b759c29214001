"""Safety: moderation, limits, blocks, headers, object access and the hostile corpus."""

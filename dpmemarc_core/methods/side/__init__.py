"""The ladder side network (`side`): a thin trainable network beside a frozen backbone."""

//! inference.local: the managed inference route (provider auth injection, model rewrite, streaming).

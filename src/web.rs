//! The pages, embedded in the binary: no build step, no CDN.
//!
//! `GET /` is the demo page (a live scoreboard and ticker over one WebSocket), `GET
//! /dashboard` the cluster dashboard, `GET /volley.js` the client (an ES module, `clients/js/volley.js`: the same file as the npm package) (charts drawn by uPlot 1.6.32, MIT, vendored under
//! `assets/vendor/` with its licence).

const DEMO_HTML: &str = include_str!("../assets/demo.html");
const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const VOLLEY_JS: &str = include_str!("../clients/js/volley.js");
const UPLOT_JS: &str = include_str!("../assets/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/vendor/uPlot.min.css");

/// A page or asset: its text and content type.
pub struct Asset {
    pub body: &'static str,
    pub content_type: &'static str,
}

/// The page or asset at `path`, if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let (body, content_type) = match path {
        "/" | "/index.html" => (DEMO_HTML, "text/html; charset=utf-8"),
        "/dashboard" => (DASHBOARD_HTML, "text/html; charset=utf-8"),
        "/volley.js" => (VOLLEY_JS, "text/javascript; charset=utf-8"),
        "/assets/uPlot.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "/assets/uPlot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    Some(Asset { body, content_type })
}

//! One resource per path with all its methods, so a known path asked with another method gets
//! 405 and `Allow` instead of falling through to "no route" (404). GET routes answer HEAD too.

use actix_web::http::Method;
use actix_web::{HttpRequest, Resource, Route, guard, web};

use crate::server::error::ApiError;

/// The resource at `path` serving each `(method, route)`; other methods get 405.
pub fn resource<const N: usize>(path: &str, routes: [(Method, Route); N]) -> Resource {
    let mut allow: Vec<String> = Vec::new();
    let mut resource = web::resource(path);
    for (method, route) in routes {
        resource = if method == Method::GET {
            allow.extend(["GET".into(), "HEAD".into()]);
            resource.route(route.guard(guard::Any(guard::Get()).or(guard::Head())))
        } else {
            allow.push(method.to_string());
            resource.route(route.method(method))
        };
    }
    let allow = allow.join(", ");
    resource.default_service(web::to(move |request: HttpRequest| {
        let allow = allow.clone();
        async move {
            Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed {
                message: format!(
                    "{} is not served on {}; it takes {allow}",
                    request.method(),
                    request.path()
                ),
                allow,
            })
        }
    }))
}

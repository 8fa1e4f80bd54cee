//! Helpers for writing middleware.

/// Implements `get_ref`, `get_mut` and `into_inner` for a middleware service
/// whose wrapped service is its field `inner`, of the type parameter `S`.
///
/// Call it inside the service's `impl` block; every atscale service uses it,
/// so they all expose their inner service the same way.
///
/// ```
/// pub struct Logged<S> {
///     inner: S,
/// }
///
/// impl<S> Logged<S> {
///     atscale_core::inner_accessors!();
/// }
///
/// let mut svc = Logged { inner: 7 };
/// *svc.get_mut() += 1;
/// assert_eq!(*svc.get_ref(), 8);
/// assert_eq!(svc.into_inner(), 8);
/// ```
#[macro_export]
macro_rules! inner_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes this layer's service, returning the inner one.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

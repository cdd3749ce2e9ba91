//! The presence, report and ledger sides of an engine set: a user's engine by the
//! route, the listing from the engines that together list everyone, reports and the
//! ledger on the home engine.

use std::sync::Arc;
use std::time::Duration;

use super::{EngineSet, Route, Topology};
use crate::broker::{
    BoxFuture, Ledger, LedgerError, OnlineUsers, Presence, PresenceError, Reaped, RedisBroker,
    ReportError, Reports, StoredReport, Subject, UserPresence,
};

impl<T: Topology> Presence for EngineSet<T> {
    fn user_online(&self, user: &Arc<str>) {
        let mut users = self.users.lock();
        users.insert(user.clone());
        if let Some(engine) = self.layout.read().user(user) {
            engine.user_online(user);
        }
    }

    fn user_offline(&self, user: &Arc<str>) {
        let mut users = self.users.lock();
        users.remove(user);
        if let Some(engine) = self.layout.read().user(user) {
            engine.user_offline(user);
        }
    }

    fn user_rooms_changed(&self, user: &Arc<str>) {
        // An engine that takes a user over writes their rooms at its first refresh.
        if let Some(engine) = self.layout.read().user(user) {
            engine.user_rooms_changed(user);
        }
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        let layout = self.layout();
        Box::pin(async move {
            let engines: Vec<&Arc<RedisBroker>> = layout
                .route
                .listing()
                .into_iter()
                .filter_map(|i| layout.engines.get(i))
                .collect();
            match engines.as_slice() {
                [] => Err(PresenceError::Unavailable(T::UNSERVED.into())),
                [one] => one.online_users(max).await,
                many => {
                    let mut parts = Vec::with_capacity(many.len());
                    for engine in many {
                        parts.push(engine.online_users(max).await?);
                    }
                    Ok(OnlineUsers::merge(parts, max))
                }
            }
        })
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        let engine = self.layout().user(user).cloned();
        Box::pin(async move {
            match engine {
                Some(engine) => engine.presence_of(user).await,
                None => Err(PresenceError::Unavailable(T::UNSERVED.into())),
            }
        })
    }
}

/// Reports are kept on the home engine's server, in every topology.
impl<T: Topology> Reports for EngineSet<T> {
    fn keeps_reports(&self) -> bool {
        true
    }

    fn write_report(
        &self,
        fields: Vec<(&'static str, String)>,
        ttl_s: u64,
    ) -> BoxFuture<'_, Result<(), ReportError>> {
        let home = self.report_home();
        Box::pin(async move { home?.write_report(fields, ttl_s).await })
    }

    fn read_reports<'a>(
        &'a self,
        fields: &'a [&'static str],
    ) -> BoxFuture<'a, Result<Vec<StoredReport>, ReportError>> {
        let home = self.report_home();
        Box::pin(async move { home?.read_reports(fields).await })
    }
}

/// The ledger is kept on the home engine's server too.
impl<T: Topology> Ledger for EngineSet<T> {
    fn hold<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, Result<bool, LedgerError>> {
        let home = self.ledger_home();
        Box::pin(async move { home?.hold(subject).await })
    }

    fn release<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, Result<bool, LedgerError>> {
        let home = self.ledger_home();
        Box::pin(async move { home?.release(subject).await })
    }

    fn reap(&self, ttl: Duration) -> BoxFuture<'_, Result<Reaped, LedgerError>> {
        let home = self.ledger_home();
        Box::pin(async move { home?.reap(ttl).await })
    }
}

impl<T: Topology> EngineSet<T> {
    fn ledger_home(&self) -> Result<Arc<RedisBroker>, LedgerError> {
        self.report_home()
            .map_err(|_| LedgerError::Unavailable(T::UNSERVED.into()))
    }

    /// The engine that keeps the reports, if anything serves the home yet.
    fn report_home(&self) -> Result<Arc<RedisBroker>, ReportError> {
        self.layout()
            .home()
            .cloned()
            .ok_or_else(|| ReportError::Unavailable(T::UNSERVED.into()))
    }
}

//! A worker marks the jobs it claims with its batch's token: if the claim committed but
//! its reply was lost, the retried claim finds them by the token and takes them again
//! instead of leaving them `running` with nobody running them.

sql_migration!("ALTER TABLE jobs ADD COLUMN claim_token uuid");

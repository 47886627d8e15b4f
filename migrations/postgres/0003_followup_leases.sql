-- Follow-up answers get a lease like jobs: which node answers one and until when. A node that
-- dies mid-answer leaves it `running`; once its lease is up any node queues it again, and the
-- dead node's late answer, should it come, is fenced off by the owner.

ALTER TABLE followups ADD COLUMN lease_owner text;
ALTER TABLE followups ADD COLUMN lease_until double precision;

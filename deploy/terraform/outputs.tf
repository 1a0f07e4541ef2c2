output "public_url" {
  description = "deploybot's URL (server.public_url)."
  value       = local.public_url
}

output "github_webhook_url" {
  description = "The GitHub App's webhook URL (`deploybot github-app create --webhook-url`)."
  value       = "${local.public_url}/webhooks/github"
}

output "gitlab_webhook_url" {
  description = "The URL of the GitLab project's or group's webhook."
  value       = "${local.public_url}/webhooks/gitlab"
}

output "slack_interactions_url" {
  description = "The Slack app's Interactivity request URL."
  value       = "${local.public_url}/slack/interactions"
}

output "trigger_api_url" {
  description = "Where CI servers start runs (`deploybot run --server`)."
  value       = local.public_url
}

output "load_balancer_dns_name" {
  description = "Point `domain_name` here (an alias or CNAME) unless `route53_zone_id` did it."
  value       = aws_lb.this.dns_name
}

output "load_balancer_zone_id" {
  description = "The load balancer's hosted zone, for an alias record."
  value       = aws_lb.this.zone_id
}

output "plan_role_arn" {
  description = "The role terraform plan runs with (DEPLOYBOT_AWS__PLAN_ROLE_ARN)."
  value       = aws_iam_role.plan.arn
}

output "apply_role_arn" {
  description = "The role terraform apply runs with (DEPLOYBOT_AWS__APPLY_ROLE_ARN)."
  value       = aws_iam_role.apply.arn
}

output "task_role_arn" {
  description = "deploybot's own role: it may only assume the plan and apply roles."
  value       = aws_iam_role.task.arn
}

output "execution_role_arn" {
  description = "The role ECS starts the task with."
  value       = aws_iam_role.execution.arn
}

output "secret_arns" {
  description = "The Secrets Manager secrets to fill in, by name (github-private-key, github-webhook-secret, ...)."
  value       = { for key, secret in aws_secretsmanager_secret.this : key => secret.arn }
}

output "log_group_name" {
  description = "The CloudWatch log group of deploybot's logs."
  value       = aws_cloudwatch_log_group.this.name
}

output "database_endpoint" {
  description = "deploybot's PostgreSQL store (automated backups for `db_backup_retention_days`)."
  value       = aws_db_instance.this.endpoint
}

output "database_secret_arn" {
  description = "The database password's secret, kept and rotated by RDS."
  value       = local.database_secret_arn
}

output "cluster_name" {
  description = "The ECS cluster."
  value       = aws_ecs_cluster.this.name
}

output "service_name" {
  description = "The ECS service (`aws ecs update-service --force-new-deployment` restarts deploybot)."
  value       = aws_ecs_service.this.name
}

output "task_security_group_id" {
  description = "The task's security group: allow it into private endpoints your deploys need (GitHub Enterprise Server, internal APIs)."
  value       = aws_security_group.task.id
}

output "runner_token_secret_arns" {
  description = "Per pool, the secret to fill with `deploybot runner-token create --pool <pool>`."
  value       = { for pool, secret in aws_secretsmanager_secret.runner_token : pool => secret.arn }
}
